// alssl label-ui: the labeling page. Plain JS, no build step, nothing loaded from elsewhere.
// Every call carries the server's token (from this page's own URL). Labels are saved one request at a time, in order.
"use strict";
(() => {
  const token = new URLSearchParams(location.search).get("token") || "";
  const $ = (id) => document.getElementById(id);

  let S = null; // the /api/query payload
  let byIndex = new Map(); // pool index -> item
  let cards = []; // card elements in query order
  let cur = 0; // position of the selected image
  let history = []; // [{index, prev}] for undo, kept in this browser's storage per run and round (survives a reload)
  let chain = Promise.resolve(); // label requests go out one at a time, in order
  let pending = 0;
  let tile = 168;

  const withToken = (path) => path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token);

  async function call(path, body) {
    const opts = body === undefined ? { cache: "no-store" }
      : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
    let r;
    try {
      r = await fetch(withToken(path), opts);
    } catch (e) {
      return { status: 0, data: { error: "The alssl server does not answer (stopped?). Start `alssl label-ui` again and reload; no label is lost." } };
    }
    let data;
    try { data = await r.json(); } catch (e) { data = { error: `${r.status} ${r.statusText}` }; }
    return { status: r.status, data };
  }

  function say(text, info) {
    const m = $("message");
    m.hidden = !text;
    m.textContent = text || "";
    m.className = info ? "info" : "";
  }

  const historyKey = () => `alssl-undo|${S.run}|${S.round}`;

  function loadHistory() {
    try {
      const h = JSON.parse(localStorage.getItem(historyKey()) || "[]");
      return Array.isArray(h) ? h.filter((e) => e && byIndex.has(e.index)) : [];
    } catch (e) { return []; }
  }

  function storeHistory() {
    try { localStorage.setItem(historyKey(), JSON.stringify(history.slice(-500))); } catch (e) { /* storage off: undo lasts this tab */ }
  }

  function setSaved() {
    const el = $("saved");
    el.dataset.pending = String(pending);
    el.textContent = pending ? "saving…" : "all saved";
  }

  async function load() {
    const { status, data } = await call("/api/query");
    if (status !== 200) { say(data.error || "Cannot load the query."); $("saved").textContent = ""; return; }
    show(data);
  }

  function show(data) {
    S = data;
    byIndex = new Map(S.items.map((it) => [it.index, it]));
    history = S.status === "open" ? loadHistory() : [];
    $("round").textContent = S.round;
    renderClasses();
    renderGrid();
    const first = S.items.findIndex((it) => !it.label);
    select(first < 0 ? 0 : first, false);
    say("");
    setSaved();
    update();
    if (S.status === "imported" && S.result) done(S.result);
    else $("done").hidden = true;
    if (S.status === "closed") say("This round is no longer open (it was imported elsewhere). Ask for a new query, then reload.");
  }

  function renderClasses() {
    const nav = $("classes");
    nav.replaceChildren();
    S.classes.forEach((name, k) => {
      const b = document.createElement("button");
      b.type = "button";
      b.dataset.class = name;
      const key = S.keys[k]; // 1-9, then a-z (the server decides; none past the 35th class)
      if (key) {
        const kbd = document.createElement("kbd");
        kbd.textContent = key;
        b.append(kbd);
        b.dataset.key = key;
      }
      b.append(document.createTextNode(name));
      b.title = key ? `${name} (key ${key})` : name;
      b.addEventListener("click", (ev) => { ev.currentTarget.blur(); choose(name); });
      nav.append(b);
    });
    // "none of these": the image is recorded as skipped in this round and never queried again
    const b = document.createElement("button");
    b.type = "button";
    b.className = "skip";
    b.dataset.class = S.skip.label;
    b.dataset.key = S.skip.key;
    const kbd = document.createElement("kbd");
    kbd.textContent = S.skip.key;
    b.append(kbd, document.createTextNode("none of these"));
    b.title = `None of these classes: skip the image (key ${S.skip.key}); it is not labeled and never queried again`;
    b.addEventListener("click", (ev) => { ev.currentTarget.blur(); choose(S.skip.label); });
    nav.append(b);
    $("skipkey").textContent = S.skip.key;
    const m = S.model;
    $("model").textContent = !m ? "no suggestions yet (the run has no labels)"
      : `suggestions: ${m.classifier} on ${m.n_labeled} labels, ` +
        (m.accuracy != null ? `${Math.round(m.accuracy * 100)} % accurate (${m.accuracy_on})` : "accuracy not measured yet") +
        `; pre-selected only at ≥ ${Math.round(m.suggest_min * 100)} % confidence from a model ≥ ${Math.round(m.suggest_min * 100)} % accurate`;
  }

  function renderGrid() {
    const grid = $("grid");
    grid.replaceChildren();
    cards = S.items.map((it, pos) => {
      const card = document.createElement("div");
      card.className = "card";
      card.dataset.index = it.index;
      const pic = document.createElement("div");
      pic.className = "pic";
      const img = document.createElement("img");
      img.alt = it.id;
      img.loading = "lazy";
      img.decoding = "async";
      img.addEventListener("load", () => pixelate(img));
      img.src = it.image;
      pic.append(img);
      const row = document.createElement("div");
      row.className = "row";
      const label = document.createElement("span");
      label.className = "label";
      const score = document.createElement("span");
      score.className = "score muted";
      row.append(label, score);
      const id = document.createElement("div");
      id.className = "id muted";
      id.textContent = it.id;
      id.title = `${it.id} (pool index ${it.index})`;
      card.append(pic, row, id);
      card.addEventListener("click", () => select(pos));
      grid.append(card);
      paint(it, card);
      return card;
    });
  }

  // Tiny images (pool pixels, small files) are upscaled nearest-neighbour so each pixel stays visible.
  function pixelate(img) {
    img.classList.toggle("pixelated", S.pixelated || img.naturalWidth * 2 <= img.clientWidth);
  }

  function paint(it, card) {
    card = card || cards[S.items.indexOf(it)];
    const label = card.querySelector(".label");
    const score = card.querySelector(".score");
    const skipped = it.label === S.skip.label;
    card.classList.toggle("labeled", !!it.label);
    card.classList.remove("missing");
    label.classList.toggle("suggestion", !it.label && !!it.suggestion);
    label.classList.toggle("weak", !it.label && !!it.suggestion && !it.preselect);
    label.classList.toggle("skipped", skipped);
    label.textContent = skipped ? "none of these" : (it.label || (it.suggestion ? `${it.suggestion}?` : ""));
    label.title = skipped ? "skipped: not labeled, never queried again" : it.label ? "your label"
      : !it.suggestion ? "" : it.preselect ? "the model's suggestion: Enter accepts it"
      : "the model is not confident: choose the class yourself";
    score.textContent = !it.label && it.suggestion && it.score != null ? `${Math.round(it.score * 100)}%` : "";
  }

  function select(pos, scroll = true) {
    if (!S || !S.items.length) return;
    cards[cur] && cards[cur].classList.remove("current");
    cur = Math.max(0, Math.min(S.items.length - 1, pos));
    cards[cur].classList.add("current");
    if (scroll) cards[cur].scrollIntoView({ block: "nearest", behavior: "auto" });
    paintButtons();
  }

  // The selected image's label is shown chosen; without one, a confident suggestion is pre-selected (dashed).
  function paintButtons() {
    const it = S.items[cur];
    for (const b of $("classes").children) {
      b.classList.toggle("chosen", !!it && it.label === b.dataset.class);
      b.classList.toggle("suggested", !!it && !it.label && !!it.preselect && it.suggestion === b.dataset.class);
      b.setAttribute("aria-pressed", String(!!it && it.label === b.dataset.class));
    }
  }

  function update() {
    const n = S.items.filter((it) => it.label).length;
    $("progress").textContent = `${n} / ${S.items.length}`;
    $("submit").disabled = S.status !== "open" || n < S.items.length;
    $("undo").disabled = S.status !== "open" || history.length === 0;
  }

  function save(index, label, prev) {
    pending += 1;
    setSaved();
    chain = chain.then(async () => {
      const { status, data } = await call("/api/label", { index, label });
      if (status !== 200) {
        const it = byIndex.get(index);
        if (it.label === label) { it.label = prev; paint(it); }
        say(data.error || "Could not save that label.");
        if (status === 409) { S.status = "closed"; }
      }
      pending -= 1;
      setSaved();
      update();
      paintButtons();
    });
    return chain;
  }

  function setLabel(it, label, record = true) {
    const prev = it.label;
    if (prev === label) return;
    it.label = label;
    paint(it);
    if (record) { history.push({ index: it.index, prev }); storeHistory(); }
    save(it.index, label, prev);
    update();
    paintButtons();
  }

  function choose(name) {
    if (!S || S.status !== "open") return;
    setLabel(S.items[cur], name);
    advance();
  }

  function advance() {
    const n = S.items.length;
    for (let step = 1; step <= n; step++) {
      const pos = (cur + step) % n;
      if (!S.items[pos].label) { select(pos); return; }
    }
    paintButtons(); // all labeled: stay
  }

  function undo() {
    if (!S || S.status !== "open") return;
    const h = history.pop();
    if (!h) return;
    storeHistory();
    const it = byIndex.get(h.index);
    const now = it.label;
    it.label = h.prev;
    paint(it);
    save(it.index, h.prev, now);
    select(S.items.indexOf(it));
    update();
  }

  async function submit() {
    const btn = $("submit");
    btn.disabled = true;
    say("");
    await chain; // every label is on the server before the import
    const { status, data } = await call("/api/submit", {});
    if (status === 200) {
      S.status = "imported";
      S.result = data;
      history = [];
      try { localStorage.removeItem(historyKey()); } catch (e) { /* nothing kept */ }
      done(data);
    } else {
      const missing = (data.missing || []).concat(data.invalid || []);
      const names = missing.slice(0, 8).map((m) => m.id).join(", ") + (missing.length > 8 ? ", …" : "");
      say((data.error || `Submit failed (${status}).`) + (names ? `\n${names}` : ""));
      for (const m of missing) {
        const pos = S.items.findIndex((it) => it.index === m.index);
        if (pos >= 0) cards[pos].classList.add("missing");
      }
      if (missing.length) select(S.items.findIndex((it) => it.index === missing[0].index));
    }
    update();
  }

  function done(res) {
    const head = res.already_imported ? `Round ${res.round} was already imported (${res.round_labels} labels).`
      : `Imported ${res.imported} labels for round ${res.round}` + (res.skipped ? ` (${res.skipped} skipped as none of these).` : ".");
    $("done-text").textContent = `${head} The run has ${res.labeled} labeled images in ${res.rounds} rounds.`;
    $("next").textContent = `Next query: ${res.next.budget} more (${res.next.strategy})`;
    $("next").disabled = false;
    $("done").hidden = false; // a fixed banner: in view wherever the page is scrolled
    $("next").focus({ preventScroll: true });
    update();
  }

  async function next() {
    const btn = $("next");
    btn.disabled = true;
    btn.textContent = "Choosing the next images…";
    const { status, data } = await call("/api/next", {});
    if (status === 200) { show(data); window.scrollTo(0, 0); return; }
    say(data.error || `Could not open the next query (${status}).`);
    btn.disabled = false;
    btn.textContent = "Next query";
  }

  function columns() {
    return getComputedStyle($("grid")).gridTemplateColumns.split(" ").filter(Boolean).length || 1;
  }

  function zoom(delta) {
    tile = Math.max(72, Math.min(480, tile + delta));
    document.documentElement.style.setProperty("--tile", `${tile}px`);
    requestAnimationFrame(() => document.querySelectorAll(".card img").forEach(pixelate));
  }

  document.addEventListener("keydown", (e) => {
    if (!S || e.altKey || e.metaKey) return;
    const key = e.key;
    if ((e.ctrlKey && key.toLowerCase() === "z") || key === "Backspace") { e.preventDefault(); undo(); return; }
    if (e.ctrlKey) return;
    const moves = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -columns(), ArrowDown: columns() };
    if (key in moves) { e.preventDefault(); select(cur + moves[key]); return; }
    if (key === "Enter") {
      if (document.activeElement && document.activeElement.tagName === "BUTTON") return; // the button's own click
      const it = S.items[cur];
      e.preventDefault();
      if (it && it.suggestion && it.preselect && !it.label) choose(it.suggestion);
      return;
    }
    if (key === "+" || key === "=") { zoom(24); return; }
    if (key === "-") { zoom(-24); return; }
    if (key.length !== 1) return;
    if (key.toLowerCase() === S.skip.key) { e.preventDefault(); choose(S.skip.label); return; }
    const k = S.keys.indexOf(key.toLowerCase());
    if (k >= 0) { e.preventDefault(); choose(S.classes[k]); }
  });

  $("undo").addEventListener("click", (ev) => { ev.currentTarget.blur(); undo(); });
  $("submit").addEventListener("click", (ev) => { ev.currentTarget.blur(); submit(); });
  $("next").addEventListener("click", (ev) => { ev.currentTarget.blur(); next(); });
  window.addEventListener("resize", () => document.querySelectorAll(".card img").forEach(pixelate));
  load();
})();
