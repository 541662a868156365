"use strict";
// Line charts of per-epoch metrics (uPlot), one line per series of each job shown: the page's job solid,
// the one compared with dashed, in the same colour for the same component, depth or stage.
const Charts = (() => {
  const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];
  const HEIGHT = 220;

  // spec: {title, log, percent, series(job) -> [{label, value(metrics) -> number}]};
  // jobs: [{label, dashed, epochs: [metrics, ...]}].
  function chart(container, spec) {
    const box = AL.el("div", { class: "chart", "data-chart": spec.title });
    box.hidden = true;
    container.append(box);
    let plot = null;
    let shape = "";

    function lines(jobs) {
      const out = [];
      for (const job of jobs) {
        const last = job.epochs[job.epochs.length - 1];
        if (!last) continue;
        spec.series(last).forEach((s, i) => out.push({ ...s, job, colour: PALETTE[i % PALETTE.length] }));
      }
      return out;
    }

    function tick(t) {  // log scales pass null for the ticks they leave unlabelled
      if (t === null) return "";
      if (spec.percent) return `${(100 * t).toFixed(0)}%`;
      return t === 0 || Math.abs(t) >= 1e-3 ? String(Number(t.toPrecision(3))) : t.toExponential(0);
    }

    function options(series) {
      const format = spec.percent ? (v) => (v === null ? "–" : `${(100 * v).toFixed(2)} %`) : (v) => AL.number(v);
      return {
        title: spec.title, width: box.clientWidth || 480, height: HEIGHT,
        scales: { x: { time: false }, y: spec.log ? { distr: 3 } : {} },
        axes: [{ label: "epoch", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500] },
               { size: 56, values: (u, ticks) => ticks.map(tick) }],
        series: [{ label: "epoch" }, ...series.map((s) => ({
          label: `${s.job.label} ${s.label}`, stroke: s.colour, width: 2, spanGaps: true,
          dash: s.job.dashed ? [6, 4] : undefined, value: (u, v) => format(v),
        }))],
      };
    }

    function update(jobs) {
      const series = lines(jobs);
      box.hidden = series.length === 0;
      box.dataset.series = series.length;
      if (!series.length) return;
      const epochs = [...new Set(jobs.flatMap((j) => j.epochs.map((m) => m.epoch)))].sort((a, b) => a - b);
      box.dataset.epochs = epochs.length;
      const byEpoch = new Map(jobs.map((j) => [j, new Map(j.epochs.map((m) => [m.epoch, m]))]));
      const data = [epochs, ...series.map((s) => epochs.map((e) => {
        const m = byEpoch.get(s.job).get(e);
        const v = m ? s.value(m) : undefined;
        return v === undefined || v === null || Number.isNaN(v) ? null : v;
      }))];
      const key = series.map((s) => `${s.job.label}|${s.job.dashed}|${s.label}`).join(";");
      if (plot && key === shape) {
        plot.setData(data);
        return;
      }
      if (plot) plot.destroy();
      shape = key;
      plot = new uPlot(options(series), data, box);
    }

    window.addEventListener("resize", () => { if (plot) plot.setSize({ width: box.clientWidth, height: HEIGHT }); });
    return { update };
  }

  // A series for each entry of a list-valued metric: per component, depth or stage.
  const each = (key, name) => (last) => (Array.isArray(last[key]) ? last[key] : [])
    .map((_, i) => ({ label: `${name} ${i + 1}`, value: (m) => (m[key] || [])[i] }));
  const one = (key, label) => (last) => (typeof last[key] === "number" ? [{ label, value: (m) => m[key] }] : []);
  const both = (...makers) => (last) => makers.flatMap((make) => make(last));

  const JOB_CHARTS = [
    { title: "Associated loss ‖b_i(s_i) − t_i‖² per component", log: true, series: each("associated_loss", "component") },
    { title: "Autoencoder loss ‖h_i(t_i) − t_{i−1}‖² per component", log: true, series: each("autoencoder_loss", "component") },
    { title: "Loss (BP: cross-entropy)", log: true, series: one("loss", "loss") },
    { title: "Accuracy", percent: true,
      series: both(one("val_accuracy", "validation"), one("train_accuracy", "train")) },
    { title: "Validation accuracy by depth (shortcut paths)", percent: true, series: each("val_accuracy_by_depth", "depth") },
    { title: "Pipeline: busy seconds per stage", series: each("busy_seconds", "stage") },
    { title: "Pipeline: bubble (share of the epoch a stage idled)", percent: true, series: each("idle_fraction", "stage") },
    { title: "Seconds per epoch", series: one("seconds", "seconds") },
  ];

  return { chart, JOB_CHARTS };
})();
