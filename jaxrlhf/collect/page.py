"""The one HTML page of the labelling server (inline CSS and JavaScript; no external resources).

Texts are put in with ``textContent`` (never parsed as HTML). Keys: 1 left, 2 right, 0 tie, s skip,
u undo. Element ids (``prompt``, ``a``, ``b``, ``left``, ``right``, ``tie``, ``skip``, ``undo``,
``count``, ``done``, ``error``) are what the browser test drives.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>jaxrlhf collect</title>
<style>
  :root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --soft: #f6f8fa;
          --blue: #0969da; --green: #1a7f37; --red: #cf222e; }
  * { box-sizing: border-box; }
  body { margin: 0; color: var(--fg); background: #fff;
         font: 16px/1.5 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; }
  header { display: flex; align-items: center; gap: 28px; padding: 14px 32px;
           border-bottom: 1px solid var(--line); background: var(--soft); }
  header h1 { margin: 0; font-size: 18px; font-weight: 650; white-space: nowrap; }
  .progress { flex: 1; display: flex; align-items: center; gap: 14px; }
  .bar { flex: 1; max-width: 520px; height: 10px; border-radius: 5px; background: #e1e6eb;
         overflow: hidden; }
  .bar > div { height: 100%; width: 0; background: var(--green); transition: width .2s; }
  #count { color: var(--muted); font-size: 14px; font-variant-numeric: tabular-nums;
           white-space: nowrap; }
  #undo { font-size: 14px; color: var(--blue); background: none; border: 0; padding: 0;
          cursor: pointer; white-space: nowrap; }
  #undo span { text-decoration: underline; }
  #undo:disabled { color: #9aa4ae; cursor: default; }
  #undo:disabled span { text-decoration: none; }
  #breakdown { color: var(--muted); font-size: 13px; white-space: nowrap; }
  main { max-width: 1240px; margin: 0 auto; padding: 24px 32px 40px; }
  .label { margin: 0 0 6px; font-size: 12px; font-weight: 650; letter-spacing: .06em;
           text-transform: uppercase; color: var(--muted); }
  .text { white-space: pre-wrap; overflow-wrap: anywhere; font-size: 17px; }
  #prompt { padding: 14px 18px; border: 1px solid var(--line); border-radius: 10px;
            background: var(--soft); }
  .columns { display: grid; grid-template-columns: 1fr 1fr; gap: 22px; margin-top: 22px; }
  .card { display: flex; flex-direction: column; padding: 16px 18px;
          border: 1px solid var(--line); border-radius: 10px; }
  .card .text { flex: 1; min-height: 110px; }
  button.pick { margin-top: 16px; padding: 14px 16px; font-size: 17px; font-weight: 600;
                color: #fff; background: var(--blue); border: 1px solid var(--blue);
                border-radius: 10px; cursor: pointer; }
  button.pick:hover { filter: brightness(1.08); }
  .others { display: flex; justify-content: center; gap: 18px; margin-top: 22px; }
  button.other { min-width: 170px; padding: 11px 22px; font-size: 16px; color: var(--fg);
                 background: #fff; border: 1px solid var(--line); border-radius: 10px;
                 cursor: pointer; }
  button.other:hover { background: var(--soft); }
  button:disabled { opacity: .55; cursor: default; }
  kbd { display: inline-block; min-width: 1.6em; margin-left: 8px; padding: 0 6px;
        font: 600 13px/1.6 ui-monospace, "DejaVu Sans Mono", monospace; text-align: center;
        border-radius: 5px; border: 1px solid rgba(0,0,0,.25); background: rgba(255,255,255,.85);
        color: var(--fg); }
  .hint { margin-top: 18px; text-align: center; color: var(--muted); font-size: 13px; }
  #done { display: none; margin: 60px auto; max-width: 640px; padding: 28px; text-align: center;
          border: 1px solid var(--line); border-radius: 12px; background: var(--soft); }
  #done h2 { margin: 0 0 8px; color: var(--green); }
  #error { display: none; margin: 0 0 16px; padding: 10px 14px; border-radius: 8px;
           color: var(--red); border: 1px solid var(--red); background: #fff5f5; }
</style>
</head>
<body>
<header>
  <h1>jaxrlhf collect</h1>
  <div class="progress">
    <div class="bar"><div id="bar"></div></div>
    <span id="count">loading…</span>
    <span id="breakdown"></span>
  </div>
  <button id="undo" type="button" disabled><span>Undo last label</span> <kbd>u</kbd></button>
</header>
<main>
  <div id="error"></div>
  <section id="task">
    <p class="label">Prompt</p>
    <div id="prompt" class="text"></div>
    <div class="columns">
      <div class="card">
        <p class="label">Response 1</p>
        <div id="a" class="text"></div>
        <button id="left" class="pick" type="button">Left is better <kbd>1</kbd></button>
      </div>
      <div class="card">
        <p class="label">Response 2</p>
        <div id="b" class="text"></div>
        <button id="right" class="pick" type="button">Right is better <kbd>2</kbd></button>
      </div>
    </div>
    <div class="others">
      <button id="tie" class="other" type="button">Tie <kbd>0</kbd></button>
      <button id="skip" class="other" type="button">Skip <kbd>s</kbd></button>
    </div>
    <p class="hint">Labels are saved as you make them; close the tab at any time and run the same
      command again to continue.</p>
  </section>
  <section id="done">
    <h2>All pairs are labelled</h2>
    <p id="summary"></p>
    <p>The server has stopped; you can close this tab.</p>
  </section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let current = null;
let busy = false;
let canUndo = false;

function plural(n, word) { return n + " " + word + (n === 1 ? "" : "s"); }

function show(state) {
  const c = state.counts;
  $("count").textContent = c.labeled + " labeled of " + c.total;
  $("breakdown").textContent = "(" + plural(c.preferences, "preference") + ", " +
    plural(c.ties, "tie") + ", " + plural(c.skips, "skip") + ")";
  $("bar").style.width = (c.total ? 100 * c.labeled / c.total : 0) + "%";
  canUndo = state.can_undo && !state.done;
  $("undo").disabled = !canUndo;
  current = state.pair;
  document.body.dataset.pairId = current ? String(current.pair_id) : "";
  if (state.done) {
    $("task").style.display = "none";
    $("done").style.display = "block";
    $("summary").textContent = plural(c.preferences, "preference") + ", " +
      plural(c.ties, "tie") + ", " + plural(c.skips, "skip") + ".";
    return;
  }
  $("task").style.display = "block";
  $("done").style.display = "none";
  $("prompt").textContent = current.prompt;
  $("a").textContent = current.a;
  $("b").textContent = current.b;
}

function fail(message) {
  $("error").textContent = message;
  $("error").style.display = "block";
}

async function call(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    fail("The jaxrlhf collect server is not running: start the same command again, then " +
         "reload this page. Nothing labelled so far is lost.");
    throw err;
  }
  const state = await response.json();
  if (!response.ok && !state.counts) { fail(state.error || response.statusText); throw state; }
  $("error").style.display = "none";
  return state;
}

async function act(path, body) {
  if (busy) return;
  busy = true;
  for (const b of document.querySelectorAll("button")) b.disabled = true;
  try {
    show(await call(path, body));
  } catch (err) {
    /* shown by fail() */
  } finally {
    busy = false;
    for (const b of document.querySelectorAll("button.pick, button.other")) b.disabled = false;
    $("undo").disabled = !canUndo;
  }
}

function pick(choice) {
  if (current) act("/api/label", {pair_id: current.pair_id, choice: choice});
}
function undo() { if (canUndo) act("/api/undo", {}); }

$("left").addEventListener("click", () => pick("left"));
$("right").addEventListener("click", () => pick("right"));
$("tie").addEventListener("click", () => pick("tie"));
$("skip").addEventListener("click", () => pick("skip"));
$("undo").addEventListener("click", undo);
document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
  const choice = {"1": "left", "2": "right", "0": "tie", "s": "skip"}[e.key.toLowerCase()];
  if (choice) { e.preventDefault(); pick(choice); }
  else if (e.key.toLowerCase() === "u") { e.preventDefault(); undo(); }
});
act("/api/state");
</script>
</body>
</html>
"""
