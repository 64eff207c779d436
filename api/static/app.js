// The ESP page: sends the comment to POST /v1/score and draws one bar per label.
// Talks only to this server (the page's Content-Security-Policy allows nothing else).
"use strict";

(function () {
  const form = document.getElementById("score-form");
  const comment = document.getElementById("comment");
  const apiKey = document.getElementById("api-key");
  const submit = document.getElementById("submit");
  const result = document.getElementById("result");
  const status = document.getElementById("status");
  const scores = document.getElementById("scores");
  const bars = document.getElementById("bars");
  const flags = document.getElementById("flags");
  const meta = document.getElementById("meta");

  function setStatus(text, isError) {
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  function serverMs(response) {
    const timing = response.headers.get("Server-Timing") || "";
    const match = /dur=([0-9.]+)/.exec(timing);
    return match ? Number(match[1]) : null;
  }

  function render(record, roundTripMs, appMs) {
    bars.replaceChildren();
    const labels = Object.keys(record.scores).sort((a, b) => record.scores[b] - record.scores[a]);
    for (const label of labels) {
      const p = record.scores[label];
      const flagged = record.flags.includes(label);
      const item = document.createElement("li");
      item.className = flagged ? "bar flagged" : "bar";
      item.dataset.label = label;
      const name = document.createElement("span");
      name.className = "label";
      name.textContent = label.replace(/_/g, " ");
      const track = document.createElement("span");
      track.className = "track";
      track.setAttribute("role", "meter");
      track.setAttribute("aria-valuemin", "0");
      track.setAttribute("aria-valuemax", "1");
      track.setAttribute("aria-valuenow", String(p));
      track.setAttribute("aria-label", label + " probability");
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.width = (p * 100).toFixed(1) + "%";
      track.appendChild(fill);
      const value = document.createElement("span");
      value.className = "value";
      value.textContent = p.toFixed(3);
      item.append(name, track, value);
      bars.appendChild(item);
    }
    flags.textContent = record.flags.length
      ? "Flagged: " + record.flags.map((f) => f.replace(/_/g, " ")).join(", ")
      : "Not flagged for any label.";
    flags.classList.toggle("flagged", record.flags.length > 0);
    const server = appMs === null ? "" : ", " + appMs.toFixed(0) + " ms in the API";
    meta.textContent = "Model " + record.model.name + " v" + record.model.version +
      (record.truncated ? " (read only the beginning of a long text)" : "") +
      " · " + roundTripMs.toFixed(0) + " ms round trip" + server;
    scores.hidden = false;
  }

  async function score() {
    const text = comment.value;
    if (!text.trim()) {
      setStatus("Type or paste a comment first.", true);
      comment.focus();
      return;
    }
    const headers = { "Content-Type": "application/json" };
    if (apiKey.value) headers["X-Goog-Api-Key"] = apiKey.value;
    submit.disabled = true;
    result.setAttribute("aria-busy", "true");
    setStatus("Scoring…", false);
    const started = performance.now();
    try {
      const response = await fetch("/v1/score", { method: "POST", headers, body: JSON.stringify({ text }) });
      const body = await response.json().catch(() => null);
      const roundTripMs = performance.now() - started;
      if (!response.ok) {
        const message = body && body.error ? body.error.message : "HTTP " + response.status;
        const retry = response.headers.get("Retry-After");
        setStatus("Could not score: " + message + (retry ? " (retry in " + retry + " s)" : ""), true);
        return;
      }
      render(body, roundTripMs, serverMs(response));
      setStatus("Scored.", false);
    } catch (err) {
      setStatus("Could not reach the API: " + err.message, true);
    } finally {
      submit.disabled = false;
      result.setAttribute("aria-busy", "false");
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    score();
  });
  comment.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      score();
    }
  });
  for (const button of document.querySelectorAll("button.example")) {
    button.addEventListener("click", () => {
      comment.value = button.dataset.text;
      comment.focus();
      score();
    });
  }
})();
