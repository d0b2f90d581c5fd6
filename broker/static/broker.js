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

function setupCountdown() {
  const time = document.querySelector("time[data-countdown]");
  const out = document.getElementById("countdown");
  if (!time || !out) return;
  const expires = Date.parse(time.getAttribute("datetime"));
  if (Number.isNaN(expires)) return;
  time.textContent = new Date(expires).toLocaleString();
  const tick = () => {
    const left = Math.round((expires - Date.now()) / 1000);
    if (left <= 0) {
      out.textContent = "expired";
      out.classList.add("expired");
      return;
    }
    out.textContent = "(" + formatLeft(left) + ")";
    setTimeout(tick, 1000);
  };
  tick();
}

document.addEventListener("DOMContentLoaded", () => {
  setupCopyButtons();
  setupCountdown();
});
