// The dashboard of `apportion serve`: polls its JSON endpoints and fills the page. Plain JavaScript,
// nothing loaded from elsewhere. Every value is set as text (never as HTML): error messages quote
// what clients sent.
"use strict";

(() => {
  const refreshMs = Number(document.body.dataset.refreshMs) || 2000;
  const runsEveryMs = 30000;  // runs change only when a benchmark rewrites its summary
  const byId = (id) => document.getElementById(id);

  async function getJSON(path) {
    const response = await fetch(path, { credentials: "same-origin", cache: "no-store" });
    if (!response.ok) {
      let message = `${path}: HTTP ${response.status}`;
      try { message += `: ${(await response.json()).error.message}`; } catch (_) { /* not JSON */ }
      throw new Error(message);
    }
    return response.json();
  }

  const integer = (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US"));
  function dollars(x) {
    if (x === null || x === undefined) return "—";
    if (x === 0) return "$0";
    return x >= 0.01 ? `$${x.toFixed(4)}` : `$${x.toPrecision(3)}`;
  }
  function seconds(s) {
    if (s === null || s === undefined) return "—";
    return s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`;
  }
  const percent = (x) => `${(100 * x).toFixed(1)}%`;
  const algorithmName = (a) => a ?? "(none)";  // a plain backend call, or refused before choosing one
  const keyName = (k) => k ?? "(no key)";
  function budgetText(limits) {
    if (!limits) return "—";
    return Object.entries(limits).map(([unit, limit]) => `${unit}=${limit}`).join(", ");
  }
  function clock(iso) {
    const at = new Date(iso);
    return Number.isNaN(at.getTime()) ? iso : at.toLocaleTimeString("en-GB", { hour12: false });
  }

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }
  function outcomeCell(status, outcome) {
    const td = document.createElement("td");
    const badge = document.createElement("span");
    badge.className = `outcome ${outcome}`;
    badge.textContent = `${status} ${outcome}`;
    td.appendChild(badge);
    return td;
  }

  // Replace a table's rows; the table shows only when it has some, its "empty" note otherwise.
  function fill(tableId, rows, emptyId) {
    const table = byId(tableId);
    const body = table.tBodies[0];
    body.replaceChildren(...rows);
    table.classList.toggle("filled", rows.length > 0);
    if (emptyId) byId(emptyId).classList.toggle("hidden", rows.length > 0);
  }
  function row(cells) {
    const tr = document.createElement("tr");
    tr.append(...cells);
    return tr;
  }

  function showRequests(data) {
    fill("in-flight", data.in_flight.map((r) => row([
      cell(r.request_id, "mono"), cell(algorithmName(r.algorithm)), cell(keyName(r.key_id), "mono"),
      cell(budgetText(r.budget)), cell(seconds(r.elapsed_s), "num"),
    ])), "in-flight-empty");
    byId("in-flight-count").textContent = `(${data.in_flight.length})`;
    fill("recent", data.recent.map((r) => row([
      cell(clock(r.finished_at)), cell(algorithmName(r.algorithm)), cell(keyName(r.key_id), "mono"),
      outcomeCell(r.status, r.outcome), cell(integer(r.spent.total_tokens), "num"), cell(dollars(r.spent.usd), "num"),
      cell(seconds(r.latency_s), "num"), cell(r.error ?? "", "error"),
    ])), "recent-empty");
    byId("recent-count").textContent = `(last ${data.recent.length} of ${data.finished_total}; keeps ${data.capacity})`;
  }

  function spendRow(name, t, nameClass) {
    return row([cell(name, nameClass), cell(integer(t.requests), "num"), cell(integer(t.ok), "num"),
      cell(integer(t.total_tokens), "num"), cell(dollars(t.usd), "num"), cell(seconds(t.mean_latency_s), "num")]);
  }
  function showSpend(data) {
    fill("by-key", data.by_key.map((t) => spendRow(keyName(t.key_id), t, "mono")));
    fill("by-algorithm", data.by_algorithm.map((t) => spendRow(algorithmName(t.algorithm), t, null)));
    const total = data.total;
    byId("since").textContent = `Since ${clock(data.since)}: ${integer(total.requests)} requests, ` +
      `${integer(total.total_tokens)} tokens, ${dollars(total.usd)} in this server process (a key's quota over ` +
      "its period and every replica: apportion keys usage).";
  }

  // One figure per run: the report's plot, then each curve's most accurate point.
  function showRuns(data) {
    const holder = byId("runs");
    holder.replaceChildren(...data.runs.map((run) => {
      const figure = document.createElement("figure");
      figure.className = "run";
      const title = document.createElement("h3");
      title.textContent = run.run ?? run.path;
      const caption = document.createElement("figcaption");
      figure.append(title, caption);
      if (run.error) {
        caption.textContent = `${run.path}: ${run.error}`;
        caption.className = "error";
        return figure;
      }
      caption.textContent = `${run.dataset} · ${run.model} · ${integer(run.questions)} questions · ${run.path}`;
      const image = document.createElement("img");
      image.alt = `accuracy against ${run.x_axis}: ${run.run}`;
      image.addEventListener("load", () => { image.dataset.loaded = "1"; });
      image.addEventListener("error", () => { image.dataset.loaded = "error"; });
      image.src = run.plot;
      figure.append(image, bestTable(run));
      return figure;
    }));
    byId("runs-empty").classList.toggle("hidden", data.runs.length > 0);
  }
  function bestTable(run) {
    const table = document.createElement("table");
    table.className = "filled runs";
    table.id = `run-${run.index}-curves`;
    const head = row(["curve", "budgets", "best accuracy", "at budget", "tokens / question", "$ / question"]
      .map((h) => { const th = document.createElement("th"); th.textContent = h; return th; }));
    const body = run.curves.map((curve) => {
      const best = curve.points.reduce((a, b) => (b.accuracy > a.accuracy ? b : a));
      const name = cell(curve.label);
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = curve.color;
      name.prepend(swatch);
      return row([name, cell(curve.points.map((p) => p.budget).join(", ")), cell(percent(best.accuracy), "num"),
        cell(String(best.budget), "num"), cell(integer(best.tokens === null ? null : Math.round(best.tokens)), "num"),
        cell(dollars(best.usd), "num")]);
    });
    const thead = document.createElement("thead");
    thead.append(head);
    const tbody = document.createElement("tbody");
    tbody.append(...body);
    table.append(thead, tbody);
    return table;
  }

  function status(text, failed) {
    const line = byId("status");
    line.textContent = text;
    line.classList.toggle("error", failed);
  }

  let lastRuns = -Infinity;
  async function tick() {
    try {
      const wantRuns = Date.now() - lastRuns >= runsEveryMs;
      const [requests, spend, runs] = await Promise.all([
        getJSON("dashboard/api/requests"), getJSON("dashboard/api/spend"),
        wantRuns ? getJSON("dashboard/api/runs") : null,
      ]);
      showRequests(requests);
      showSpend(spend);
      if (runs) { showRuns(runs); lastRuns = Date.now(); }
      status(`updated ${new Date().toLocaleTimeString("en-GB", { hour12: false })} · ` +
        `${requests.in_flight.length} in flight · ${requests.finished_total} finished`, false);
      document.body.dataset.ready = "1";
    } catch (err) {
      status(`cannot reach the server: ${err.message}`, true);
    } finally {
      setTimeout(tick, refreshMs);
    }
  }
  tick();
})();
