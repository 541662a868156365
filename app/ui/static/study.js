"use strict";
// One study: the trial table, validation accuracy against each searched parameter (uPlot, a point per
// complete trial), importances; redrawn whenever the study's event stream says a trial ended.
(() => {
  const { el } = AL;
  let study = AL.pageData().study;
  const space = study.spec.space;
  const params = Object.keys(space);
  const STUDY_TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const plots = new Map();  // parameter -> {box, plot}

  const show = (value) => (typeof value === "number" && !Number.isInteger(value) ? AL.number(value) : String(value));

  function table() {
    const head = document.querySelector("#trials thead");
    if (!head.rows.length) {
      head.append(el("tr", {}, ...["#", "state", ...params, "val acc", "job"].map((t) => el("th", { text: t }))));
    }
    const body = document.querySelector("#trials tbody");
    body.replaceChildren(...study.trials.map((t) => el("tr", { "data-number": t.number, "data-state": t.state },
      el("td", { text: String(t.number) }),
      el("td", {}, AL.statusBadge(t.state)),
      ...params.map((p) => el("td", { "data-param": p, text: p in t.params ? show(t.params[p]) : "–" })),
      el("td", { "data-key": "value", text: AL.percent(t.value) }),
      el("td", {}, t.job_id ? el("a", { href: `/ui/jobs/${encodeURIComponent(t.job_id)}`, text: t.job_status }) : "–"),
    )));
  }

  // x of a trial on a parameter's axis: its value, or the index of its choice.
  function position(param, value) {
    const choices = space[param].choices;
    return choices ? choices.findIndex((c) => c === value) : value;
  }

  function chart(param) {
    const spec = space[param];
    const complete = study.trials.filter((t) => t.state === "complete" && param in t.params);
    const points = complete.map((t) => [position(param, t.params[param]), t.value, t.number === study.best?.number])
      .sort((a, b) => a[0] - b[0]);
    const data = [points.map((p) => p[0]), points.map((p) => (p[2] ? null : p[1])), points.map((p) => (p[2] ? p[1] : null))];
    let entry = plots.get(param);
    if (!entry) {
      const box = el("div", { class: "chart", "data-param": param });
      document.getElementById("charts").append(box);
      entry = { box, plot: null };
      plots.set(param, entry);
    }
    entry.box.dataset.points = points.length;
    if (entry.plot) entry.plot.destroy();
    const choices = spec.choices;
    const x = choices ? { time: false, range: [-0.5, choices.length - 0.5] } : { time: false, distr: spec.log ? 3 : 1 };
    const xAxis = choices
      ? { label: param, incrs: [1], values: (u, ticks) => ticks.map((t) => (Number.isInteger(t) && t >= 0 && t < choices.length ? String(choices[t]) : "")) }
      : { label: param };
    const dots = (colour, size) => ({ stroke: colour, paths: () => null, points: { show: true, size, fill: colour } });
    entry.plot = new uPlot({
      title: param, width: entry.box.clientWidth || 480, height: 220,
      scales: { x, y: { range: (u, min, max) => [Math.max(0, min - 0.02), Math.min(1, max + 0.02)] } },
      axes: [xAxis, { size: 56, values: (u, ticks) => ticks.map((t) => `${(100 * t).toFixed(0)}%`) }],
      series: [{ label: param, value: (u, v) => (v === null ? "–" : choices ? String(choices[v]) : AL.number(v)) },
        { label: "trial", value: (u, v) => AL.percent(v), ...dots("#1f77b4", 8) },
        { label: "best", value: (u, v) => AL.percent(v), ...dots("#d62728", 13) }],
    }, data, entry.box);
  }

  function importances() {
    if (!study.importances) return;
    const rows = Object.entries(study.importances).map(([p, v]) => el("tr", { "data-param": p },
      el("td", { text: p }), el("td", { text: AL.percent(v) })));
    document.getElementById("importances").replaceChildren(el("table", { class: "list numbers" }, el("tbody", {}, ...rows)));
  }

  function render() {
    document.getElementById("status").replaceChildren(AL.statusBadge(study.status));
    const ended = study.trials.filter((t) => t.state !== "running" && t.state !== "waiting").length;
    document.getElementById("done").textContent = `${ended} ended, ${study.trials.length - ended} running, of ${study.spec.trials}`;
    const best = study.best;
    document.getElementById("best").textContent = best ? `trial ${best.number}: ${AL.percent(best.value)}` : "–";
    document.getElementById("model").replaceChildren(best && best.model ? AL.modelLink(best.model) : "–");
    document.getElementById("cancel").hidden = STUDY_TERMINAL.has(study.status) || study.status === "cancelling";
    AL.showError(document.getElementById("error"), study.error ? new Error(study.error) : null);
    document.getElementById("no-trials").hidden = study.trials.some((t) => t.state === "complete");
    table();
    params.forEach(chart);
    importances();
  }

  async function refresh() {
    study = await AL.api("GET", `/v1/studies/${encodeURIComponent(study.id)}`);
    render();
  }

  document.getElementById("cancel").addEventListener("click", async () => {
    try {
      study = await AL.api("POST", `/v1/studies/${encodeURIComponent(study.id)}/cancel`);
      render();
    } catch (error) {
      AL.showError(document.getElementById("cancel-error"), error);
    }
  });

  render();
  if (!STUDY_TERMINAL.has(study.status)) {
    const source = new EventSource(`/v1/studies/${encodeURIComponent(study.id)}/events`);
    source.addEventListener("trial", refresh);
    source.addEventListener("end", (event) => {
      source.close();
      study = JSON.parse(event.data);
      render();
    });
    source.addEventListener("deleted", () => source.close());  // else the browser reconnects, to a 404
  }
})();
