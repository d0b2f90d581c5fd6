// Copy buttons and the expiry countdown. Loaded from 'self' (CSP script-src 'self');
// no inline scripts anywhere, and the page works without this file.
"use strict";

function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    return navigator.clipboard.writeText(text);
  }
  // Fallback for non-secure contexts: a temporary, off-screen textarea.
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "offscreen";
  document.body.appendChild(area);
  area.select();
  try {
    document.execCommand("copy");
  } finally {
    document.body.removeChild(area);
  }
  return Promise.resolve();
}

function setupCopyButtons() {
  document.querySelectorAll("button[data-copy]").forEach((button) => {
    button.addEventListener("click", () => {
      const source = document.getElementById(button.dataset.copy);
      if (!source) return;
      copyText(source.textContent.trim()).then(() => {
        // The button keeps its aria-label, so say it once in the status region.
        const status = document.getElementById("copy-status");
        if (status) status.textContent = (button.getAttribute("aria-label") || "Copy").replace(/^Copy/, "Copied");
        const label = button.textContent;
        button.textContent = "Copied";
        button.classList.add("copied");
        setTimeout(() => {
          button.textContent = label;
          button.classList.remove("copied");
        }, 1500);
      });
    });
  });
}

function formatLeft(seconds) {
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = seconds % 60;
  const pad = (n) => String(n).padStart(2, "0");
  return (h > 0 ? h + ":" + pad(m) : String(m)) + ":" + pad(s) + " left";
}

// Minutes left at which the status region speaks; in between it stays quiet.
const MILESTONES = [10, 5, 1];

function setupCountdown() {
  const time = document.querySelector("time[data-countdown]");
  const out = document.getElementById("countdown");
  const status = document.getElementById("countdown-status");
  if (!time || !out) return;
  const expires = Date.parse(time.getAttribute("datetime"));
  if (Number.isNaN(expires)) return;
  // The local time with its zone ("5:00:00 PM CET"): a bare time is ambiguous.
  time.textContent = new Date(expires).toLocaleString(undefined, {
    dateStyle: "medium",
    timeStyle: "long",
  });
  let spoken = null;
  const say = (text) => {
    if (status && text !== spoken) {
      status.textContent = text;
      spoken = text;
    }
  };
  const tick = () => {
    const left = Math.round((expires - Date.now()) / 1000);
    if (left <= 0) {
      out.textContent = "expired";
      out.classList.add("expired");
      say("These credentials have expired.");
      return;
    }
    out.textContent = "(" + formatLeft(left) + ")";
    const minutes = Math.ceil(left / 60);
    const milestone = MILESTONES.find((m) => minutes === m);
    if (milestone !== undefined) {
      say("These credentials expire in " + milestone + (milestone === 1 ? " minute." : " minutes."));
    }
    setTimeout(tick, 1000);
  };
  tick();
}

document.addEventListener("DOMContentLoaded", () => {
  setupCopyButtons();
  setupCountdown();
});
