"use strict";
// A model's try-it panel: draw a digit (image models), type a row of raw values or (text models) a text, then
// predict once per depth to see where the shortcut paths agree with the full one. It predicts with an alias (a
// split's version drawn per request, so each row says which version answered) or a version.
(() => {
  const { el } = AL;
  const { versions, choices } = AL.pageData();
  const select = document.getElementById("version");
  const inputs = document.getElementById("inputs");
  const pad = document.getElementById("pad");
  const preview = document.getElementById("preview");
  const ink = pad.getContext("2d", { willReadFrequently: true });
  const SUPERSAMPLE = 8;
  let choice = null;
  let version = null;  // the chosen version, or the alias's version with the largest share (a split's take one input)
  const isText = () => version.input_kind === "text";

  function clear() {
    ink.clearRect(0, 0, pad.width, pad.height);
    if (isText()) inputs.value = "";
    else show(new Array(version.features).fill(0));
  }

  function choose() {
    choice = choices[Number(select.value)];
    version = versions.find((v) => v.version === choice.version);
    document.getElementById("input-help").textContent = isText()
      ? `Input: a text (the model reads its first ${version.features} tokens; the rest is cut)`
      : `Input: ${version.features} raw values, comma-separated`;
    inputs.spellcheck = isText();
    document.getElementById("pad-box").hidden = !version.canvas;
    if (version.canvas) {
      preview.width = version.canvas.width;
      preview.height = version.canvas.height;
    }
    clear();
  }

  // The values, as the model gets them, in the text box and (image models) the preview.
  function show(values) {
    inputs.value = values.join(", ");
    if (!version.canvas) return;
    const { width, height, max } = version.canvas;
    const image = preview.getContext("2d").createImageData(width, height);
    values.forEach((v, i) => {
      const grey = 255 - Math.round((255 * v) / max);
      image.data.set([grey, grey, grey, 255], 4 * i);
    });
    preview.getContext("2d").putImageData(image, 0, 0);
  }

  function inkBox() {
    const alpha = ink.getImageData(0, 0, pad.width, pad.height).data;
    let [x0, y0, x1, y1] = [pad.width, pad.height, -1, -1];
    for (let y = 0; y < pad.height; y += 1) {
      for (let x = 0; x < pad.width; x += 1) {
        if (alpha[4 * (y * pad.width + x) + 3]) {
          x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y);
        }
      }
    }
    return x1 < 0 ? null : { x: x0, y: y0, w: x1 - x0 + 1, h: y1 - y0 + 1 };
  }

  // The drawing cropped to its ink, scaled into the box the dataset's digits fill (MNIST: 20 of 28 pixels,
  // digits: all 8) and centred, then averaged down to the model's pixels and scaled to its raw range.
  function sample() {
    const { width, height, max } = version.canvas;
    const box = inkBox();
    if (!box) return show(new Array(width * height).fill(0));
    const small = document.createElement("canvas");
    small.width = width * SUPERSAMPLE;
    small.height = height * SUPERSAMPLE;
    const fill = width >= 20 ? 20 / 28 : 1;
    const scale = fill * Math.min(small.width / box.w, small.height / box.h);
    const [w, h] = [box.w * scale, box.h * scale];
    const context = small.getContext("2d", { willReadFrequently: true });
    context.drawImage(pad, box.x, box.y, box.w, box.h, (small.width - w) / 2, (small.height - h) / 2, w, h);
    const alpha = context.getImageData(0, 0, small.width, small.height).data;
    const values = [];
    for (let y = 0; y < height; y += 1) {
      for (let x = 0; x < width; x += 1) {
        let sum = 0;
        for (let dy = 0; dy < SUPERSAMPLE; dy += 1) {
          for (let dx = 0; dx < SUPERSAMPLE; dx += 1) {
            sum += alpha[4 * ((y * SUPERSAMPLE + dy) * small.width + x * SUPERSAMPLE + dx) + 3];
          }
        }
        const v = (max * sum) / (255 * SUPERSAMPLE * SUPERSAMPLE);
        values.push(max > 1 ? Math.round(v) : Number(v.toFixed(3)));
      }
    }
    show(values);
  }

  let drawing = false;
  const at = (event) => {
    const rect = pad.getBoundingClientRect();
    return [((event.clientX - rect.left) * pad.width) / rect.width, ((event.clientY - rect.top) * pad.height) / rect.height];
  };
  pad.addEventListener("pointerdown", (event) => {
    drawing = true;
    pad.setPointerCapture(event.pointerId);
    Object.assign(ink, { lineWidth: pad.width * 0.09, lineCap: "round", lineJoin: "round", strokeStyle: "#111" });
    ink.beginPath();
    ink.moveTo(...at(event));
    ink.lineTo(...at(event));
    ink.stroke();
  });
  pad.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    ink.lineTo(...at(event));
    ink.stroke();
  });
  for (const type of ["pointerup", "pointercancel"]) {
    pad.addEventListener(type, () => {
      if (drawing) sample();
      drawing = false;
    });
  }

  function probabilityTable(answers) {
    const table = document.getElementById("probabilities");
    const classes = version.classes.map(String);
    // Where the classes have names, `predictions` holds indices and `labels` the names.
    const predictedOf = (answer) => (answer.labels ? answer.labels[0] : String(answer.predictions[0]));
    const full = predictedOf(answers[answers.length - 1]);
    table.tHead.replaceChildren(el("tr", {}, el("th", { text: "depth" }), el("th", { text: "version" }),
      el("th", { text: "prediction" }), el("th", { text: "agrees with full" }),
      ...classes.map((c) => el("th", { text: c }))));
    table.tBodies[0].replaceChildren(...answers.map((answer, i) => {
      const predicted = predictedOf(answer);
      return el("tr", { "data-depth": i + 1 },
        el("td", { text: i + 1 === answers.length ? `${i + 1} (full)` : String(i + 1) }),
        el("td", { class: "answered-by", text: String(answer.version) }),
        el("td", { class: "prediction", text: predicted }),
        el("td", { text: predicted === full ? "yes" : "no" }),
        ...answer.probabilities[0].map((p, j) => el("td", {
          class: classes[j] === predicted ? "p top" : "p", text: p.toFixed(2),
          style: `background: rgba(31, 119, 180, ${p.toFixed(3)}); color: ${p > 0.5 ? "#fff" : "inherit"}`,
        })));
    }));
    table.hidden = false;
  }

  async function predict() {
    const error = document.getElementById("predict-error");
    const row = isText() ? inputs.value : inputs.value.split(/[\s,]+/).filter(Boolean).map(Number);
    if (!isText() && row.some(Number.isNaN)) {
      return AL.showError(error, new Error("the input holds something that is not a number"));
    }
    const depths = Array.from({ length: choice.depth }, (_, i) => i + 1);
    try {
      const ask = (depth) => AL.api("POST", choice.path, { inputs: [row], depth });
      probabilityTable(await Promise.all(depths.map(ask)));
      AL.showError(error, null);
    } catch (e) {
      AL.showError(error, e);
    }
  }

  select.addEventListener("change", choose);
  document.getElementById("clear").addEventListener("click", clear);
  document.getElementById("predict").addEventListener("click", predict);
  choose();
})();
