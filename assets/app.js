() => {
  // Token distribution popups. One fixed-position popup for the whole page, filled from the
  // hovered/clicked token's data-top (JSON rows {t: text, p: probability, c: chosen}).
  // Delegated listeners on document: lanes re-render several times a second, so handlers on
  // individual spans would be lost.
  if (window.__miniyaieTokens) return;
  window.__miniyaieTokens = true;
  const popup = document.createElement("div");
  popup.id = "dist-popup";
  popup.setAttribute("role", "tooltip");
  document.body.appendChild(popup);
  let pinned = null;

  const show = (tok) => {
    let rows;
    try { rows = JSON.parse(tok.dataset.top || "[]"); } catch (e) { return; }
    const vis = (t) => t.replace(/ /g, "␣").replace(/\n/g, "↵");
    const esc = (t) => t.replace(/[&<>"]/g, (ch) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[ch]));
    const body = rows.map((r) =>
      `<tr class="${r.c ? "chosen" : ""}"><td class="d-tok">${esc(vis(r.t))}</td>` +
      `<td class="d-bar"><span style="width:${Math.max(1, Math.round(r.p * 100))}%"></span></td>` +
      `<td class="d-p">${(r.p * 100).toFixed(1)}%</td><td class="d-mark">${r.c ? "◀ chosen" : ""}</td></tr>`).join("");
    popup.innerHTML = `<div class="d-head">token #${Number(tok.dataset.i) + 1} · p = ${(Number(tok.dataset.p) * 100).toFixed(1)}%</div>` +
      `<table>${body}</table><div class="d-foot">top candidates after temperature / top-k / top-p</div>`;
    const r = tok.getBoundingClientRect();
    popup.style.display = "block";
    const w = popup.offsetWidth, h = popup.offsetHeight;
    let left = Math.min(r.left, window.innerWidth - w - 8);
    let top = r.bottom + 6;
    if (top + h > window.innerHeight - 4) top = r.top - h - 6;
    popup.style.left = Math.max(4, left) + "px";
    popup.style.top = Math.max(4, top) + "px";
  };
  const hide = () => { popup.style.display = "none"; };

  document.addEventListener("mouseover", (e) => {
    const tok = e.target.closest && e.target.closest(".tok");
    if (tok && !pinned) show(tok);
  });
  document.addEventListener("mouseout", (e) => {
    const tok = e.target.closest && e.target.closest(".tok");
    if (tok && !pinned) hide();
  });
  document.addEventListener("click", (e) => {
    const tok = e.target.closest && e.target.closest(".tok");
    if (tok) {
      document.querySelectorAll(".tok.pinned").forEach((t) => t.classList.remove("pinned"));
      pinned = tok; tok.classList.add("pinned"); show(tok);
    } else if (!(e.target.closest && e.target.closest("#dist-popup"))) {
      if (pinned) pinned.classList.remove("pinned");
      pinned = null; hide();
    }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") { pinned = null; hide(); } });
  window.addEventListener("scroll", () => { if (!pinned) hide(); }, true);
}
