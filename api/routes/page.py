"""GET /: a small upload page (plain HTML and a little JS) that calls POST /v1/models/{name}/predict."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["page"])

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>prior-zoo</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 44rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.4rem; }
  form { display: flex; gap: .5rem; flex-wrap: wrap; align-items: center; margin-bottom: 1rem; }
  .row { display: grid; grid-template-columns: 17rem 1fr 4.5rem; gap: .5rem; align-items: center; margin: .2rem 0; }
  .bar { background: #eee; height: 1rem; border-radius: 3px; overflow: hidden; }
  .bar > div { height: 100%; background: #3b7dd8; }
  .bar.total > div { background: #555; } .bar.aleatoric > div { background: #d89b3b; }
  .bar.epistemic > div { background: #c0392b; }
  .label { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
  #error { color: #b00; } img#preview { max-width: 12rem; max-height: 12rem; display: block; margin: .5rem 0; }
  small { color: #666; }
</style>
</head>
<body>
<h1>prior-zoo: predictive uncertainty</h1>
<form id="form">
  <select id="model" aria-label="model"></select>
  <input id="file" type="file" accept="image/*" aria-label="image">
  <button id="submit" type="submit">Predict</button>
</form>
<div id="error" role="alert"></div>
<img id="preview" alt="" hidden>
<div id="result" hidden>
  <h2>Top classes</h2>
  <div id="top"></div>
  <h2>Uncertainty <small id="how"></small></h2>
  <div id="split"></div>
</div>
<script>
const $ = (id) => document.getElementById(id);
function row(label, value, width, cls) {
  const r = document.createElement("div");
  r.className = "row";
  const name = document.createElement("span");
  name.className = "label"; name.textContent = label; name.title = label;
  const bar = document.createElement("div");
  bar.className = "bar " + (cls || "");
  const fill = document.createElement("div");
  fill.style.width = Math.max(0, Math.min(100, 100 * width)).toFixed(1) + "%";
  bar.appendChild(fill);
  const num = document.createElement("span");
  num.textContent = value;
  r.append(name, bar, num);
  return r;
}
async function loadModels() {
  const res = await fetch("/v1/models");
  const body = await res.json();
  if (!res.ok) { $("error").textContent = body.error || res.statusText; return; }
  for (const m of body.models) {
    const o = document.createElement("option");
    o.value = m.name; o.textContent = m.name + " (" + m.kind + ", " + m.predictive.mode + ")";
    o.dataset.classes = m.num_classes;
    o.dataset.note = m.predictive.note || "";
    $("model").appendChild(o);
  }
}
$("file").addEventListener("change", () => {
  const f = $("file").files[0];
  if (f) { $("preview").src = URL.createObjectURL(f); $("preview").hidden = false; }
});
$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("error").textContent = "";
  const f = $("file").files[0];
  if (!f) { $("error").textContent = "choose an image first"; return; }
  const data = new FormData();
  data.append("files", f, f.name);
  const name = $("model").value;
  const res = await fetch("/v1/models/" + encodeURIComponent(name) + "/predict?top_k=5", {method: "POST", body: data});
  const body = await res.json();
  if (!res.ok) { $("error").textContent = body.error || res.statusText; $("result").hidden = true; return; }
  const p = body.predictions[0];
  $("top").replaceChildren(...p.top.map((t) =>
    row(t.label === null ? "class " + t.index : t.label, (100 * t.prob).toFixed(1) + "%", t.prob)));
  const classes = Number($("model").selectedOptions[0].dataset.classes) || 2;
  const scale = Math.log(classes);  // the largest possible entropy, in nats
  $("split").replaceChildren(
    row("total (entropy)", p.entropy.toFixed(3), p.entropy / scale, "total"),
    row("aleatoric (expected entropy)", p.expected_entropy.toFixed(3), p.expected_entropy / scale, "aleatoric"),
    row("epistemic (mutual information)", p.mutual_information.toFixed(3), p.mutual_information / scale,
        "epistemic"));
  const note = $("model").selectedOptions[0].dataset.note;
  $("how").textContent = "nats, " + body.mode + " mode, " + body.samples + " samples; bars relative to log(classes)"
    + (note ? ". Note: " + note : "");
  $("result").hidden = false;
});
loadModels();
</script>
</body>
</html>
"""


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> HTMLResponse:
    return HTMLResponse(PAGE)
