// asgi-worker browser client: GET, and wait out "202 Accepted". No dependencies.
//
//   import { fetchWhenReady } from "/client.js";
//   const response = await fetchWhenReady("/slow?n=100000", {
//     onPending: (attempt) => { status.textContent = `processing… (${attempt})`; },
//     onProgress: (state) => { bar.value = state.progress ?? 0; label.textContent = state.message; },
//   });
//
// Every duration is in seconds, as in HTTP's Retry-After and Prefer: wait=N.

/** Seconds to wait when a 202 has no usable Retry-After. */
export const DEFAULT_RETRY_AFTER = 1;
/** The shortest pause between two requests, whatever Retry-After says. */
export const MIN_RETRY_AFTER = 0.05;

// With onProgress, the JSON 202 is asked for at the lowest weight that still names it, so
// that the app's own answer is negotiated as the caller's Accept alone would have it.
const JSON_TOO = "application/json;q=0.001";
const DELTA_SECONDS = /^\d+(?:\.\d+)?$/;
const WEEKDAY = /^(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)[a-z]*,? /;

/** The response was still pending (202) when the timeout ran out. */
export class PendingTimeoutError extends Error {
  /**
   * @param {string} url the URL asked for
   * @param {number} attempts requests sent
   * @param {number} timeout the overall timeout, in seconds
   * @param {Response | null} response the last 202, or null if none came back in time
   */
  constructor(url, attempts, timeout, response) {
    const status = response ? response.status : "none";
    super(
      `${url} still pending after ${attempts} request(s) in ${timeout} s (last status: ${status})`,
    );
    this.name = "PendingTimeoutError";
    this.url = url;
    this.attempts = attempts;
    this.timeout = timeout;
    this.response = response;
  }
}

/**
 * Seconds a Retry-After value asks to wait, or null if it is missing or invalid.
 * Accepts delta-seconds ("3", decimals too) and an HTTP-date; a past date means 0.
 * @param {string | null | undefined} value
 * @param {number} [now] milliseconds since the epoch (default: Date.now())
 * @returns {number | null}
 */
export function parseRetryAfter(value, now = Date.now()) {
  if (value === null || value === undefined) return null;
  const text = String(value).trim();
  if (DELTA_SECONDS.test(text)) return Number(text);
  // An HTTP-date (IMF-fixdate, RFC 850 or asctime) starts with the day of the week and is in
  // GMT (asctime does not say so). Date.parse alone accepts far more than that.
  if (!WEEKDAY.test(text)) return null;
  const when = Date.parse(/ GMT$/.test(text) ? text : `${text} GMT`);
  if (Number.isNaN(when)) return null;
  return Math.max(0, (when - now) / 1000);
}

/**
 * @typedef {object} JobState where the job behind a 202 stands
 * @property {"queued" | "running"} status
 * @property {number | null} progress 0 to 1, as the handler last reported it
 * @property {string | null} message the handler's last message
 * @property {number | null} position jobs due before it on the queue (0: next)
 * @property {number | null} eta_seconds seconds until the response is likely ready
 */

/**
 * The job state a JSON 202 carries, or null for an empty or unreadable body.
 * @param {Response} response
 * @returns {Promise<JobState | null>}
 */
export async function jobState(response) {
  if (!(response.headers.get("content-type") || "").startsWith("application/json")) return null;
  let data;
  try {
    data = await response.clone().json();
  } catch {
    return null;
  }
  if (data === null || typeof data !== "object" || typeof data.status !== "string") return null;
  const number = (value) => (typeof value === "number" && Number.isFinite(value) ? value : null);
  return {
    status: data.status,
    progress: number(data.progress),
    message: typeof data.message === "string" ? data.message : null,
    position: Number.isInteger(data.position) ? data.position : null,
    eta_seconds: number(data.eta_seconds),
  };
}

/**
 * The pause before asking again: Retry-After (default 1 s if missing or invalid),
 * within [MIN_RETRY_AFTER, retryAfterMax].
 * @param {string | null} value
 * @param {number} retryAfterMax
 * @returns {number} seconds
 */
export function retryDelay(value, retryAfterMax) {
  const seconds = parseRetryAfter(value) ?? DEFAULT_RETRY_AFTER;
  return Math.max(MIN_RETRY_AFTER, Math.min(seconds, retryAfterMax));
}

/**
 * GET `url` until the answer is not 202 Accepted; resolve with that Response.
 *
 * Sends `Prefer: wait=N` (RFC 7240) so a server that supports it may hold the request and
 * answer directly; on a 202 it waits Retry-After seconds (clamped) and asks again.
 * Any status other than 202 resolves as it is; network errors reject as fetch does.
 *
 * @param {string | URL} url
 * @param {object} [options]
 * @param {number} [options.timeout=30] seconds for the whole exchange; then it rejects
 *   with a PendingTimeoutError (and aborts a request in flight)
 * @param {number | null} [options.wait=5] seconds the server may hold each request
 *   (whole seconds, always less than the time left); null or < 1 sends no Prefer header.
 *   Prefer is not CORS-safelisted: cross-origin, it needs a preflight the server allows.
 * @param {number} [options.retryAfterMax=10] the longest pause between requests
 * @param {AbortSignal} [options.signal] aborts everything; rejects with its reason
 * @param {(attempt: number, response: Response) => (void | Promise<void>)} [options.onPending]
 *   called after each 202 (attempt counts from 1), e.g. to show "processing"
 * @param {(state: JobState, response: Response) => (void | Promise<void>)} [options.onProgress]
 *   called after each 202 that carries the job's state: with it, requests also accept
 *   application/json (at q=0.001, after the caller's Accept), which the server answers with
 *   {status, progress, message, position, eta_seconds}. For a bar that moves every
 *   Retry-After, pass wait: null (a held request answers only when its wait ends).
 * @param {HeadersInit} [options.headers] extra request headers
 * @returns {Promise<Response>}
 */
export async function fetchWhenReady(url, options = {}) {
  const { timeout = 30, wait = 5, retryAfterMax = 10, signal, onPending, onProgress, headers } =
    options;
  if (!(Number.isFinite(timeout) && timeout > 0)) {
    throw new RangeError(`timeout must be a finite number of seconds > 0, not ${timeout}`);
  }
  if (!(retryAfterMax > 0)) throw new RangeError(`retryAfterMax must be > 0, not ${retryAfterMax}`);
  signal?.throwIfAborted();

  const deadline = performance.now() + timeout * 1000;
  const controller = new AbortController();
  let attempts = 0;
  let last = null;
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    controller.abort();
  }, timeout * 1000);
  const forward = () => controller.abort(signal.reason);
  signal?.addEventListener("abort", forward, { once: true });
  // The reason to reject with once the controller has fired: ours, or the caller's.
  const stopped = () =>
    timedOut ? new PendingTimeoutError(String(url), attempts, timeout, last) : signal.reason;

  try {
    for (;;) {
      const remaining = (deadline - performance.now()) / 1000;
      if (remaining <= 0) {
        timedOut = true;
        throw stopped();
      }
      const requestHeaders = new Headers(headers);
      if (onProgress) {
        requestHeaders.set("accept", `${requestHeaders.get("accept") || "*/*"}, ${JSON_TOO}`);
      }
      // The server may hold the request N seconds: its answer must come before the deadline.
      const seconds = wait === null || wait === undefined
        ? 0
        : Math.min(Math.floor(wait), Math.ceil(remaining) - 1);
      if (seconds >= 1) {
        const previous = requestHeaders.get("prefer");
        requestHeaders.set("prefer", previous ? `${previous}, wait=${seconds}` : `wait=${seconds}`);
      }
      attempts += 1;
      let response;
      try {
        response = await fetch(url, { headers: requestHeaders, signal: controller.signal });
      } catch (error) {
        if (controller.signal.aborted) throw stopped();
        throw error;
      }
      if (response.status !== 202) return response;
      last = response;
      if (onPending) await onPending(attempts, response);
      if (onProgress) {
        const state = await jobState(response);
        if (state) await onProgress(state, response);
      }
      const pause = retryDelay(response.headers.get("retry-after"), retryAfterMax) * 1000;
      const left = Math.max(0, deadline - performance.now());
      // If the next request would come too late, wait out the time (the timer fires) and stop.
      const tooLate = pause >= left;
      await sleep(tooLate ? left : pause, controller.signal).catch(() => {
        throw stopped();
      });
      if (tooLate) {
        timedOut = true;
        throw stopped();
      }
    }
  } finally {
    clearTimeout(timer);
    signal?.removeEventListener("abort", forward);
  }
}

function sleep(milliseconds, signal) {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(signal.reason);
    const done = () => {
      signal.removeEventListener("abort", stop);
      resolve();
    };
    const stop = () => {
      clearTimeout(id);
      reject(signal.reason);
    };
    const id = setTimeout(done, milliseconds);
    signal.addEventListener("abort", stop, { once: true });
  });
}
