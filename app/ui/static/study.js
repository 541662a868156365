"use strict";
// One study: the trial table, validation accuracy against each searched parameter (uPlot, a point per
// complete trial), a Pareto study's front (SVG), importances; redrawn whenever the study's event stream
// says a trial ended.
(() => {
  const { el } = AL;
  let study = AL.pageData().study;
  const space = study.spec.space;
  const params = Object.keys(space);
  const STUDY_TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const plots = new Map();  // parameter -> {box, plot}

  // The objective: val_accuracy, time_to_accuracy, or a Pareto front of val_accuracy and train_seconds.
  const goal = study.spec.objectives ? "pareto" : study.spec.objective || "val_accuracy";
  const NOT_REACHED = 1e9;  // al/study.py: a time trial that never reached its target scores above this
  const accuracy = (t) => (goal === "pareto" ? t.values?.[0] : goal === "time_to_accuracy" ? t.result?.val_accuracy : t.value);
  const seconds = (x) => `${AL.number(x)} s`;
  function objective(t) {
    if (goal === "pareto") return t.values ? `${AL.percent(t.values[0])}, ${seconds(t.values[1])}` : "–";
    if (goal === "time_to_accuracy" && t.value !== null && t.value !== undefined) {
      return t.value >= NOT_REACHED ? `not reached (${AL.percent(accuracy(t))})` : seconds(t.value);
    }
    return AL.percent(t.value);
  }
  const OBJECTIVE_HEADS = { val_accuracy: "val acc", time_to_accuracy: "seconds to target", pareto: "val acc, seconds" };

  const show = (value) => (typeof value === "number" && !Number.isInteger(value) ? AL.number(value) : String(value));

  function table() {
    const head = document.querySelector("#trials thead");
    if (!head.rows.length) {
      head.append(el("tr", {}, ...["#", "state", ...params, OBJECTIVE_HEADS[goal], "job"].map((t) => el("th", { text: t }))));
    }
    const body = document.querySelector("#trials tbody");
    body.replaceChildren(...study.trials.map((t) => el("tr", { "data-number": t.number, "data-state": t.state },
      el("td", { text: String(t.number) }),
      el("td", {}, AL.statusBadge(t.state)),
      ...params.map((p) => el("td", { "data-param": p, text: p in t.params ? show(t.params[p]) : "–" })),
      el("td", { "data-key": "value", text: objective(t) }),
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
    const points = complete.map((t) => [position(param, t.params[param]), accuracy(t), t.number === study.best?.number])
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

  // The front of a Pareto study: accuracy (up) against train seconds (right), in a plain SVG.
  function pareto() {
    const svg = document.getElementById("pareto");
    if (!svg) return;
    const svgEl = (tag, attrs, text) => {
      const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
      Object.entries(attrs).forEach(([k, v]) => node.setAttribute(k, v));
      if (text !== undefined) node.textContent = text;
      return node;
    };
    const complete = study.trials.filter((t) => t.state === "complete" && t.values);
    const onFront = new Set((study.pareto || []).map((t) => t.number));
    const [left, right, top, bottom] = [56, 510, 10, 220];
    const xs = complete.map((t) => t.values[1]), ys = complete.map((t) => t.values[0]);
    const [x0, x1] = [0, Math.max(...xs, 1e-9) * 1.05];
    const [y0, y1] = [Math.max(0, Math.min(...ys, 1) - 0.02), Math.min(1, Math.max(...ys, 0) + 0.02)];
    const px = (x) => left + ((x - x0) / (x1 - x0)) * (right - left);
    const py = (y) => bottom - ((y - y0) / (y1 - y0 || 1)) * (bottom - top);
    const front = complete.filter((t) => onFront.has(t.number)).sort((a, b) => a.values[1] - b.values[1]);
    svg.replaceChildren(
      svgEl("line", { class: "axis", x1: left, y1: bottom, x2: right, y2: bottom }),
      svgEl("line", { class: "axis", x1: left, y1: top, x2: left, y2: bottom }),
      svgEl("text", { x: (left + right) / 2, y: 250, "text-anchor": "middle" }, "train seconds"),
      svgEl("text", { x: left, y: 236, "text-anchor": "middle" }, AL.number(x0)),
      svgEl("text", { x: right, y: 236, "text-anchor": "end" }, AL.number(x1)),
      svgEl("text", { x: left - 4, y: bottom, "text-anchor": "end" }, AL.percent(y0)),
      svgEl("text", { x: left - 4, y: top + 8, "text-anchor": "end" }, AL.percent(y1)),
      svgEl("path", { d: front.map((t, i) => `${i ? "L" : "M"}${px(t.values[1])},${py(t.values[0])}`).join(" ") }),
      ...complete.map((t) => {
        const dot = svgEl("circle", { cx: px(t.values[1]), cy: py(t.values[0]), r: onFront.has(t.number) ? 6 : 4,
          class: onFront.has(t.number) ? "front" : "trial", "data-number": t.number });
        dot.append(svgEl("title", {}, `trial ${t.number}: ${objective(t)}`));
        return dot;
      }),
    );
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
    document.getElementById("best").textContent = best ? `trial ${best.number}: ${objective(best)}` : "–";
    document.getElementById("model").replaceChildren(best && best.model ? AL.modelLink(best.model) : "–");
    document.getElementById("cancel").hidden = STUDY_TERMINAL.has(study.status) || study.status === "cancelling";
    AL.showError(document.getElementById("error"), study.error ? new Error(study.error) : null);
    document.getElementById("no-trials").hidden = study.trials.some((t) => t.state === "complete");
    table();
    params.forEach(chart);
    pareto();
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
