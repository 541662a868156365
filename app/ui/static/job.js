"use strict";
// One job: its status from its event stream, curves that grow as epochs end, the epoch table, test accuracy
// by depth at the end, and optionally a second job on the same axes.
(() => {
  const { el } = AL;
  const data = AL.pageData();
  const main = { job: data.job, label: `${data.job.name} [${data.job.spec.method}]`, dashed: false, epochs: [] };
  let other = null;  // the job compared with, and its stream
  const select = document.getElementById("compare");
  const charts = Charts.JOB_CHARTS.map((spec) => Charts.chart(document.getElementById("charts"), spec));

  const COLUMNS = [
    ["epoch", "epoch", String], ["seconds", "seconds", AL.number], ["train_accuracy", "train acc", AL.percent],
    ["val_accuracy", "val acc", AL.percent], ["val_accuracy_by_depth", "val acc by depth", AL.percent],
    ["associated_loss", "associated loss", AL.number], ["autoencoder_loss", "autoencoder loss", AL.number],
    ["loss", "loss", AL.number], ["busy_seconds", "stage busy s", AL.number], ["idle_fraction", "bubble", AL.percent],
  ];

  function epochTable() {
    const table = document.getElementById("epochs");
    const first = main.epochs[0];
    if (!first) return;
    const columns = COLUMNS.filter(([key]) => key in first);
    if (!table.tHead.rows.length) {
      table.tHead.append(el("tr", {}, ...columns.map(([key, title]) => el("th", { "data-key": key, text: title }))));
    }
    const body = table.tBodies[0];
    for (const m of main.epochs.slice(body.rows.length)) {
      body.append(el("tr", { "data-epoch": m.epoch }, ...columns.map(([key, , format]) => el("td", {
        "data-key": key, text: Array.isArray(m[key]) ? m[key].map(format).join(" / ") : format(m[key]),
      }))));
    }
  }

  function testByDepth() {
    const box = document.getElementById("test-depth");
    const finished = [main, other].filter((j) => j && j.job.metrics && j.job.metrics.test_accuracy_by_depth);
    if (!finished.length) return;
    const depth = Math.max(...finished.map((j) => j.job.metrics.test_accuracy_by_depth.length));
    const rows = [];
    for (let k = 0; k < depth; k += 1) {
      rows.push(el("div", { class: "depth-row" }, el("span", { class: "depth-label", text: `depth ${k + 1}` }),
        el("div", { class: "depth-bars" }, ...finished.map((j) => {
          const value = j.job.metrics.test_accuracy_by_depth[k];
          return el("div", { class: `hbar${j.dashed ? " other" : ""}`, "data-depth": k + 1, "data-job": j.job.id },
            el("div", { class: "fill", style: `width: ${value === undefined ? 0 : 100 * value}%` }),
            el("span", { text: `${AL.percent(value)} · ${j.label}` }));
        }))));
    }
    box.replaceChildren(...rows);
  }

  let pending = false;
  function draw() {  // at most once a frame: a finished job's stream replays every epoch at once
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; redraw(); });
  }

  function redraw() {
    const shown = other ? [main, other] : [main];
    for (const c of charts) c.update(shown);
    document.getElementById("no-epochs").hidden = shown.some((j) => j.epochs.length);
    epochTable();
    testByDepth();
  }

  function showJob(job) {
    main.job = job;
    document.getElementById("status").replaceChildren(AL.statusBadge(job.status));
    document.getElementById("progress").replaceChildren(AL.progressBar(job));
    document.getElementById("attempts").textContent = job.attempts;
    document.getElementById("resumed").textContent = job.resumed_from_epoch ?? "–";
    document.getElementById("started").textContent = AL.localTime(job.started_at);
    document.getElementById("finished").textContent = AL.localTime(job.finished_at);
    document.getElementById("model").replaceChildren(job.model ? AL.modelLink(job.model) : "–");
    const waiting = document.getElementById("waiting");  // why a queued job is not running yet
    waiting.textContent = job.status === "queued" && job.waiting ? `Waiting: ${job.waiting}` : "";
    waiting.hidden = !waiting.textContent;
    const error = document.getElementById("error");
    error.textContent = job.error || "";
    error.hidden = !job.error;
    document.getElementById("cancel").hidden = AL.TERMINAL.has(job.status) || job.status === "cancelling";
    testByDepth();
  }

  function compareWith(jobId) {
    if (other) other.source.close();
    other = null;
    const url = new URL(location.href);
    if (jobId) url.searchParams.set("compare", jobId);
    else url.searchParams.delete("compare");
    history.replaceState(null, "", url);
    if (jobId) {
      const option = [...select.options].find((o) => o.value === jobId);
      const next = { job: { id: jobId }, label: option.dataset.label, dashed: true, epochs: [] };
      next.source = AL.follow(jobId, {
        onEpoch: (m) => { next.epochs.push(m); draw(); },
        onEnd: (job) => { next.job = job; draw(); },
      });
      other = next;
    }
    draw();
  }

  document.getElementById("cancel").addEventListener("click", async () => {
    try {
      showJob(await AL.cancel(main.job.id));
      AL.showError(document.getElementById("cancel-error"), null);
    } catch (e) {
      AL.showError(document.getElementById("cancel-error"), e);
    }
  });
  select.addEventListener("change", () => compareWith(select.value));

  showJob(data.job);
  AL.follow(data.job.id, {
    onEpoch: (m) => { main.epochs.push(m); draw(); },
    onProgress: showJob,
    onEnd: showJob,
  });
  const wanted = new URLSearchParams(location.search).get("compare");
  if (wanted && [...select.options].some((o) => o.value === wanted)) {
    select.value = wanted;
    compareWith(wanted);
  }
})();
