"use strict";
// The jobs page: the list, kept live by the event streams of its unfinished jobs, and the submit form.
(() => {
  const { el } = AL;
  // A browser opens at most 6 connections to a server over HTTP/1.1: streams leave room for the page's requests.
  const MAX_STREAMS = 4;
  const tbody = document.querySelector("#jobs tbody");
  const rows = new Map();  // job id -> its <tr>
  const waiting = [];
  let streams = 0;

  function row(job) {
    const cancelButton = AL.TERMINAL.has(job.status) || job.status === "cancelling" ? null
      : el("button", { class: "danger small", text: "Cancel", "data-cancel": job.id, onclick: () => cancelJob(job.id) });
    const metrics = job.metrics || {};
    const method = `${job.spec.method || "al"} · ${(job.spec.model && job.spec.model.arch) || "mlp"}`
      + (job.spec.pipeline && job.spec.pipeline.mode !== "sequential" ? ` · ${job.spec.pipeline.mode}` : "");
    return el("tr", { "data-job": job.id, "data-status": job.status },
      el("td", {}, AL.jobLink(job), el("div", { class: "muted small", text: job.id })),
      el("td", { text: job.dataset }),
      el("td", { text: method }),
      el("td", {}, AL.statusBadge(job.status), job.error ? el("div", { class: "error small", text: job.error }) : null),
      el("td", {}, AL.progressBar(job)),
      el("td", { class: "num", text: AL.percent(metrics.val_accuracy) }),
      el("td", { class: "num", text: AL.percent(metrics.test_accuracy) }),
      el("td", { class: "small", text: AL.localTime(job.created_at) }),
      el("td", {}, cancelButton));
  }

  function show(job, first = false) {
    const fresh = row(job);
    const old = rows.get(job.id);
    if (old) old.replaceWith(fresh);
    else if (first) tbody.prepend(fresh);
    else tbody.append(fresh);
    rows.set(job.id, fresh);
    document.getElementById("no-jobs").hidden = rows.size > 0;
  }

  // Follow a job's stream, or queue it while MAX_STREAMS are open; each stream that ends starts the next.
  function watch(jobId, first = false) {
    if (first) waiting.unshift(jobId);
    else waiting.push(jobId);
    openWaiting();
  }

  function openWaiting() {
    while (streams < MAX_STREAMS && waiting.length) {
      streams += 1;
      AL.follow(waiting.shift(), { onProgress: show, onEnd: (job) => { show(job); streams -= 1; openWaiting(); } });
    }
  }

  async function cancelJob(jobId) {
    const error = document.getElementById("submit-error");
    try {
      show(await AL.cancel(jobId));
      AL.showError(error, null);
    } catch (e) {
      AL.showError(error, e);
    }
  }

  const list = (text) => text.split(",").map((s) => s.trim()).filter(Boolean);

  function spec(form) {
    const f = Object.fromEntries(new FormData(form));
    const body = { dataset: f.dataset, method: f.method, preset: f.preset, model: { arch: f.arch },
                   training: {}, pipeline: { mode: f.mode } };
    if (f.name) body.name = f.name;
    if (f.widths) body.model.widths = list(f.widths).map(Number);
    if (f.epochs) body.training.epochs = Number(f.epochs);
    if (f.devices) body.pipeline.devices = list(f.devices);
    return body;
  }

  const form = document.getElementById("submit");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const error = document.getElementById("submit-error");
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const job = await AL.api("POST", "/v1/jobs", spec(form));
      AL.showError(error, null);
      show(job, true);
      watch(job.id, true);
    } catch (e) {
      AL.showError(error, e);
    } finally {
      button.disabled = false;
    }
  });

  const wanted = new URLSearchParams(location.search).get("dataset");  // from the datasets page's "train" links
  if (wanted) form.elements.dataset.value = wanted;

  for (const job of AL.pageData().jobs) {
    show(job);
    if (!AL.TERMINAL.has(job.status)) watch(job.id);
  }
  document.getElementById("no-jobs").hidden = rows.size > 0;
})();
