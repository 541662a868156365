"use strict";
// What every dashboard page uses: building DOM (user data only ever as text), API calls with the API's
// own error messages, a job's event stream, and the formats of numbers, times, status and progress.
const AL = (() => {
  const TERMINAL = new Set(["succeeded", "failed", "cancelled", "pruned"]);

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    node.append(...children.filter((c) => c !== null && c !== undefined));  // strings become text nodes
    return node;
  }

  function pageData() {
    const node = document.getElementById("page-data");
    return node ? JSON.parse(node.textContent) : {};
  }

  // The API's message: FastAPI's {"detail": ...} or the v2 protocol's {"error": ...}.
  function errorMessage(status, text) {
    let detail = text;
    try {
      const body = JSON.parse(text);
      detail = body.detail ?? body.error ?? text;
    } catch { /* not JSON: the text itself */ }
    return `${status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`;
  }

  // The session's CSRF token (the page carries it): the API refuses a write with the session's cookie without it.
  const csrfToken = () => document.querySelector('meta[name="csrf-token"]').content;

  async function api(method, path, body) {
    const init = { method, credentials: "same-origin", headers: { "X-CSRF-Token": csrfToken() } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    const text = await response.text();
    if (!response.ok) throw new Error(errorMessage(response.status, text));
    return text ? JSON.parse(text) : null;
  }

  function showError(node, error) {
    node.textContent = error ? (error.message || String(error)) : "";
    node.hidden = !error;
  }

  // The job's stream (GET /v1/jobs/{id}/events): every epoch once, each change of progress, then the end.
  function follow(jobId, { onEpoch, onProgress, onEnd }) {
    const source = new EventSource(`/v1/jobs/${encodeURIComponent(jobId)}/events`);
    let lastEpoch = 0;  // a reconnected stream starts again from the first epoch
    source.addEventListener("epoch", (event) => {
      const metrics = JSON.parse(event.data);
      if (metrics.epoch > lastEpoch) {
        lastEpoch = metrics.epoch;
        if (onEpoch) onEpoch(metrics);
      }
    });
    if (onProgress) source.addEventListener("progress", (event) => onProgress(JSON.parse(event.data)));
    source.addEventListener("end", (event) => {
      source.close();
      if (onEnd) onEnd(JSON.parse(event.data));
    });
    source.addEventListener("deleted", () => source.close());  // else the browser reconnects, to a 404
    return source;
  }

  const percent = (x) => (x === null || x === undefined || Number.isNaN(x) ? "–" : `${(100 * x).toFixed(2)} %`);
  const number = (x) => (x === null || x === undefined ? "–" : Number(x).toPrecision(4));
  const localTime = (iso) => (iso ? new Date(iso).toLocaleString() : "–");

  function fraction(job) {
    const p = job.progress;
    if (job.status === "succeeded") return 1;
    if (!p.epochs) return 0;
    return Math.min(1, (p.epoch + (p.steps ? p.step / p.steps : 0)) / p.epochs);
  }

  const statusBadge = (status) => el("span", { class: `status ${status}`, text: status });

  function progressBar(job) {
    const done = fraction(job);
    const bar = el("div", { class: `bar ${job.status}`, role: "progressbar", "aria-valuenow": Math.round(100 * done),
                            "aria-valuemin": 0, "aria-valuemax": 100 });
    bar.append(el("div", { style: `width: ${(100 * done).toFixed(1)}%` }));
    const p = job.progress;
    const step = p.steps && !TERMINAL.has(job.status) ? ` · step ${p.step}/${p.steps}` : "";
    return el("div", { class: "progress" }, bar, el("span", { class: "small", text: `epoch ${p.epoch}/${p.epochs}${step}` }));
  }

  const jobLink = (job) => el("a", { href: `/ui/jobs/${encodeURIComponent(job.id)}`, text: job.name });

  const modelLink = (model) => el("a", { href: `/ui/models/${encodeURIComponent(model.name)}`,
                                         text: `${model.name} v${model.version}` });

  const cancel = (jobId) => api("POST", `/v1/jobs/${encodeURIComponent(jobId)}/cancel`);

  document.addEventListener("DOMContentLoaded", () => {
    for (const node of document.querySelectorAll("[data-time]")) node.textContent = localTime(node.dataset.time);
  });

  return { TERMINAL, el, pageData, csrfToken, api, errorMessage, showError, follow, percent, number, localTime, statusBadge, progressBar,
           jobLink, modelLink, cancel };
})();
