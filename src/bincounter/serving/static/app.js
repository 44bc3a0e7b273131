// The one-bin page: send the photo to v1/count, show the count, the probability of each
// count and the verdict. Plain JS, no build step, no network but this server.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("check"), photo = $("photo"), drop = $("drop"), expectedInput = $("expected");
  const button = $("submit"), statusOut = $("status"), errorOut = $("error"), preview = $("preview");
  const result = $("result"), countOut = $("count"), confidenceOut = $("confidence");
  const verdictOut = $("verdict"), bars = $("bars"), rule = $("rule"), countSetOut = $("count-set");
  // What the server's verdicts assume (ui/config.json); the verdict itself is the server's.
  let settings = null;
  let chosen = null;
  let previewUrl = null;
  let latest = 0;  // only the newest request may draw: a slow older answer must not replace it

  const pct = (p) => (100 * p).toFixed(1) + "%";

  function showRule() {
    if (!settings) { rule.textContent = ""; return; }
    if (settings.rule === "posterior") {
      rule.textContent = "Verdict: the probability that the inventory's count is right, given the photo and an " +
        "inventory error rate of " + pct(settings.error_rate) + ": mismatch at " + pct(settings.flag_threshold) +
        " or less, match at " + pct(settings.match_threshold) + " or more, otherwise unsure (a person counts the bin). " +
        "Thresholds from " + settings.thresholds_from + ".";
    } else {
      rule.textContent = "Verdict: mismatch when the model gives the expected count at most " +
        pct(settings.flag_threshold) + ", match at " + pct(settings.match_threshold) +
        " or more, otherwise unsure (a person counts the bin). Thresholds from " + settings.thresholds_from + ".";
    }
  }

  fetch("ui/config.json").then((r) => (r.ok ? r.json() : null)).then((c) => {
    if (c && typeof c.flag_threshold === "number" && typeof c.match_threshold === "number") settings = c;
  }).catch(() => {}).finally(showRule);

  function showError(message) {
    errorOut.textContent = message;
    errorOut.hidden = false;
    result.hidden = true;
    statusOut.textContent = "";
  }

  function clearError() {
    errorOut.hidden = true;
    errorOut.textContent = "";
  }

  function choose(file) {
    if (!file) return;
    chosen = file;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    preview.hidden = false;
    preview.src = previewUrl;
    count();
  }

  // A file the browser cannot show may still be one the server can read: only hide it.
  preview.addEventListener("error", () => { preview.hidden = true; });

  photo.addEventListener("change", () => choose(photo.files[0]));
  ["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer && e.dataTransfer.files.length) choose(e.dataTransfer.files[0]);
  });
  form.addEventListener("submit", (e) => { e.preventDefault(); count(); });
  expectedInput.addEventListener("change", () => { if (chosen) count(); });

  function readExpected() {
    const text = expectedInput.value.trim();
    if (text === "") return { value: null };
    if (!/^\d+$/.test(text) || Number(text) > 1000) return { error: "The expected count must be a whole number from 0 to 1000." };
    return { value: Number(text) };
  }

  async function count() {
    clearError();
    if (!chosen) { showError("Choose a bin photo first."); return; }
    const expected = readExpected();
    if (expected.error) { showError(expected.error); return; }
    const url = "v1/count" + (expected.value === null ? "" : "?expected=" + expected.value);
    const ticket = ++latest;
    button.disabled = true;
    statusOut.textContent = "Counting…";
    let response, data = null;
    try {
      response = await fetch(url, {
        method: "POST", body: chosen,
        headers: { "Content-Type": chosen.type || "application/octet-stream" },
      });
      try { data = await response.json(); } catch (e) { data = null; }
    } catch (e) {
      if (ticket === latest) showError("The server could not be reached (" + e.message + "). Try again.");
      return;
    } finally {
      if (ticket === latest) button.disabled = false;
    }
    if (ticket !== latest) return;
    if (!response.ok) {
      const detail = data && data.detail ? (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)) : response.statusText;
      if ([400, 413, 415, 422].includes(response.status)) {
        showError("This file could not be read as a bin photo (" + detail + "). Choose a JPEG or PNG photo.");
      } else {
        showError("The server could not count the photo (" + response.status + ": " + detail + "). Try again later.");
      }
      return;
    }
    if (!data || !Array.isArray(data.probabilities) || typeof data.count !== "number") {
      showError("The server's answer was not understood.");
      return;
    }
    render(data, expected.value);
  }

  // The count of class 0 (as bincounter.serving.verdict.first_count): every answer carries its count and probabilities.
  function firstCount(data) {
    const p = data.probabilities;
    let best = 0;
    for (let i = 1; i < p.length; i++) if (p[i] > p[best]) best = i;
    return data.count - best;
  }

  function itemsText(labels) {
    const words = labels.map(String);
    const last = words[words.length - 1];
    const joined = words.length === 1 ? last : words.slice(0, -1).join(", ") + " or " + last;
    return joined + (words.length === 1 && last === "1" ? " item" : " items");
  }

  function render(data, expected) {
    const first = firstCount(data);
    const probs = data.probabilities;
    countOut.textContent = String(data.count);
    confidenceOut.textContent = "(" + pct(data.confidence) + " sure)";
    if (Array.isArray(data.count_set) && data.count_set.length) {
      countSetOut.textContent = "The bin holds " + itemsText(data.count_set) +
        (typeof data.count_set_coverage === "number" ? " (right " + pct(data.count_set_coverage) +
          " of the time on held-out photos)." : ".");
      countSetOut.hidden = false;
    } else {
      countSetOut.hidden = true;
    }
    bars.replaceChildren();
    probs.forEach((p, i) => {
      const n = first + i;
      const li = document.createElement("li");
      li.dataset.count = String(n);
      li.dataset.probability = String(p);
      if (n === data.count) li.classList.add("predicted");
      if (n === expected) li.classList.add("expected");
      const label = document.createElement("span");
      label.className = "bar-label";
      label.textContent = n + (n === 1 ? " item" : " items");
      const track = document.createElement("span");
      track.className = "bar-track";
      track.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.className = "bar-fill";
      fill.style.width = (100 * p).toFixed(1) + "%";
      track.appendChild(fill);
      const value = document.createElement("span");
      value.className = "bar-value";
      value.textContent = pct(p);
      li.setAttribute("aria-label", label.textContent + ": " + pct(p) +
        (n === data.count ? ", the predicted count" : "") + (n === expected ? ", the expected count" : ""));
      li.append(label, track, value);
      bars.appendChild(li);
    });
    verdictOut.className = "verdict";
    verdictOut.removeAttribute("data-verdict");
    if (expected === null) {
      verdictOut.textContent = "Type the expected count to get a verdict.";
    } else {
      const p = typeof data.probability_of_expected === "number" ? data.probability_of_expected : null;
      const right = typeof data.probability_record_right === "number" ? data.probability_record_right : null;
      const v = ["match", "mismatch", "unsure"].includes(data.verdict) ? data.verdict : "unsure";
      verdictOut.dataset.verdict = v;
      verdictOut.classList.add(v);
      const items = expected + (expected === 1 ? " item" : " items");
      const why = right !== null ? "the inventory's count is right with probability " + pct(right) +
        (typeof data.error_rate === "number" ? " (at an error rate of " + pct(data.error_rate) + ")" : "")
        : (p !== null ? "the model gives " + items + " a probability of " + pct(p) : "");
      if (p === null) {
        verdictOut.textContent = "Unsure: " + items + " is outside the counts this model knows (" + first + "–" +
          (first + probs.length - 1) + "); a person should count this bin.";
      } else if (v === "match") {
        verdictOut.textContent = "Match: " + why + ".";
      } else if (v === "mismatch") {
        verdictOut.textContent = "Mismatch: the bin does not hold " + items + " (" + why + "); the model counts " +
          data.count + ".";
      } else {
        verdictOut.textContent = "Unsure: " + why + "; a person should count this bin.";
      }
    }
    result.hidden = false;
    statusOut.textContent = "Counted.";
  }
})();
