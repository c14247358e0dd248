// featsvm serve: send each image on its own (raw body, kept in memory by the server), show
// the result or the error per file, keep the batch for the CSV. No external assets.
"use strict";
(function () {
  const LABELS = ["benign", "early_pre_b", "pre_b", "pro_b"];
  const drop = document.getElementById("drop");
  const input = document.getElementById("files");
  const runSel = document.getElementById("run");
  const heat = document.getElementById("heatmap");
  const tbody = document.querySelector("#results tbody");
  const messages = document.getElementById("messages");
  const status = document.getElementById("status");
  const csvBtn = document.getElementById("csv");
  const clearBtn = document.getElementById("clear");
  const maxBytes = Number(drop.dataset.maxBytes);
  const rows = [];  // results and errors, in upload order
  let pending = 0;
  let queue = Promise.resolve();

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function pct(v) { return (100 * v).toFixed(1) + " %"; }
  function flag(v) { return v === null || v === undefined ? "\u2013" : (v ? "yes" : "no"); }
  function message(text) { messages.appendChild(el("div", { class: "msg" }, text)); }
  function refresh() {
    const ok = rows.filter((r) => !r.error).length;
    const bad = rows.length - ok;
    status.textContent = rows.length === 0 && pending === 0 ? "No images yet." :
      `${ok} image(s) classified` + (bad ? `, ${bad} refused` : "") +
      (pending ? `, ${pending} in progress\u2026` : ".");
    csvBtn.disabled = ok === 0;
    clearBtn.disabled = rows.length === 0 || pending > 0;
  }

  function fillRow(tr, r) {
    tr.replaceChildren();
    tr.className = r.error ? "error" : "done";
    tr.appendChild(el("td", { class: "file" }, r.file));
    if (r.error) {
      const td = el("td", { class: "error-text", colspan: String(8 + LABELS.length) }, r.error);
      tr.appendChild(td);
      return;
    }
    tr.appendChild(el("td", { class: "run", title: r.run_id }, r.model));
    tr.appendChild(el("td", { class: "label", "data-label": r.pred_label }, r.pred_display));
    tr.appendChild(el("td", { class: "pmal num" }, r.prob_malignant.toFixed(3)));
    for (const lab of LABELS) tr.appendChild(el("td", { class: "p num" }, r.proba[lab].toFixed(3)));
    tr.appendChild(el("td", { class: "abstain " + (r.abstain ? "flag-yes" : "") }, flag(r.abstain)));
    tr.appendChild(el("td", { class: "ood " + (r.ood ? "flag-yes" : "") }, flag(r.ood)));
    tr.appendChild(el("td", { class: "shares" }, r.heatmap ?
      `${pct(r.heat_cells)} / ${pct(r.heat_corner)}` : "\u2013"));
    const td = el("td");
    if (r.heatmap) {
      td.appendChild(el("img", { class: "heatmap", src: r.heatmap,
        alt: `heatmap (${r.method}) of ${r.file}`, title: `${r.method}: evidence for ${r.explained}` }));
    } else td.textContent = "\u2013";
    tr.appendChild(td);
  }

  async function send(file, run, withHeat) {
    const tr = el("tr", { class: "pending", "data-file": file.name });
    tr.appendChild(el("td", { class: "file" }, file.name));
    tr.appendChild(el("td", { colspan: String(8 + LABELS.length) }, "waiting\u2026"));
    tbody.appendChild(tr);
    pending += 1; refresh();
    await (queue = queue.then(async () => {
      let r;
      if (file.size > maxBytes) {
        r = { file: file.name, error: `${file.name} is larger than the ${maxBytes / 1e6} MB limit per image; downscale it` };
      } else {
        try {
          const resp = await fetch(`/api/predict?run=${run}&heatmap=${withHeat ? 1 : 0}`, {
            method: "POST", body: file,
            headers: { "Content-Type": "application/octet-stream", "X-Filename": encodeURIComponent(file.name) },
          });
          r = await resp.json();
          if (!resp.ok && !r.error) r = { file: file.name, error: `server error ${resp.status}` };
        } catch (e) {
          r = { file: file.name, error: `${file.name}: the server did not answer (${e})` };
        }
      }
      r.file = file.name;
      rows.push(r);
      fillRow(tr, r);
      if (r.error) message(r.error);
      pending -= 1; refresh();
    }));
  }

  function handle(files) {
    messages.replaceChildren();
    const run = runSel.value;
    for (const f of files) send(f, run, heat.checked);
  }

  input.addEventListener("change", () => { handle(Array.from(input.files)); input.value = ""; });
  for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => {
    e.preventDefault(); drop.classList.add("over");
  });
  for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, (e) => {
    e.preventDefault(); drop.classList.remove("over");
  });
  drop.addEventListener("drop", (e) => handle(Array.from(e.dataTransfer.files)));

  function csvCell(v) {
    const s = v === null || v === undefined ? "" : String(v);
    return /[",\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
  }
  csvBtn.addEventListener("click", () => {
    const head = ["file", "sha256", "run_id", "model", "pred_label", "prob_malignant",
      ...LABELS.map((l) => "prob_" + l), "abstain", "ood", "heatmap_method",
      "heat_cells", "heat_background", "heat_corner"];
    const lines = [head.join(",")];
    for (const r of rows) {
      if (r.error) continue;
      const b = (v) => (v === null || v === undefined ? "" : (v ? 1 : 0));
      const f = (v) => (v === null || v === undefined ? "" : v.toFixed(6));
      lines.push([r.file, r.sha256, r.run_id, r.model, r.pred_label, f(r.prob_malignant),
        ...LABELS.map((l) => f(r.proba[l])), b(r.abstain), b(r.ood), r.method || "",
        f(r.heat_cells), f(r.heat_background), f(r.heat_corner)].map(csvCell).join(","));
    }
    const blob = new Blob([lines.join("\n") + "\n"], { type: "text/csv" });
    const a = el("a", { href: URL.createObjectURL(blob), download: "featsvm-predictions.csv" });
    document.body.appendChild(a); a.click(); a.remove();
  });
  clearBtn.addEventListener("click", () => {
    rows.length = 0; tbody.replaceChildren(); messages.replaceChildren(); refresh();
  });
  refresh();
})();
