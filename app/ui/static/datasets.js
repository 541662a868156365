"use strict";
// The datasets page: an upload with its progress (XMLHttpRequest reports upload progress, fetch does not).
(() => {
  const { el } = AL;
  const form = document.getElementById("upload");
  const bar = document.getElementById("upload-progress");
  const status = document.getElementById("upload-status");
  const error = document.getElementById("upload-error");

  function added(d) {
    document.querySelector("#datasets tbody").prepend(el("tr", { class: "added" },
      el("td", { text: d.id }), el("td", { text: d.name }), el("td", { class: "num", text: d.rows }),
      el("td", { text: `[${d.shape.join(", ")}]` }), el("td", { text: d.classes.length }),
      el("td", { class: "num", text: d.size_bytes.toLocaleString() }), el("td", { text: AL.localTime(d.created_at) }),
      el("td", {}, el("a", { href: `/ui/jobs?dataset=${encodeURIComponent(d.id)}`, text: "train" }))));
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const button = form.querySelector("button");
    const request = new XMLHttpRequest();
    request.open("POST", "/v1/datasets");
    request.setRequestHeader("X-CSRF-Token", AL.csrfToken());
    request.upload.addEventListener("progress", (e) => {
      if (!e.lengthComputable) return;
      bar.value = e.loaded / e.total;
      status.textContent = e.loaded < e.total ? `${Math.round(100 * bar.value)} % sent` : "checking the file…";
    });
    request.addEventListener("loadend", () => {
      button.disabled = false;
      bar.hidden = true;
      if (request.status === 201) {
        const dataset = JSON.parse(request.responseText);
        status.textContent = `uploaded as ${dataset.id}`;
        AL.showError(error, null);
        added(dataset);
        form.reset();
      } else {
        status.textContent = "";
        AL.showError(error, new Error(request.status ? AL.errorMessage(request.status, request.responseText)
          : "the upload did not reach the server"));
      }
    });
    button.disabled = true;
    bar.value = 0;
    bar.hidden = false;
    AL.showError(error, null);
    request.send(new FormData(form));
  });
})();
