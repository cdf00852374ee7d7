// Entry point: tabs, then the three views (clip, live, models & training jobs).

import { initClip } from "./clip.js";
import { initLive } from "./live.js";
import { initModels } from "./models.js";

function initTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  const show = (name) => {
    for (const tab of tabs) {
      const on = tab.dataset.tab === name;
      tab.setAttribute("aria-selected", String(on));
      document.getElementById(tab.getAttribute("aria-controls")).hidden = !on;
    }
    if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  };
  for (const tab of tabs) tab.addEventListener("click", () => show(tab.dataset.tab));
  const wanted = location.hash.slice(1);
  show(tabs.some((t) => t.dataset.tab === wanted) ? wanted : "clip");
}

initTabs();
initModels();
initClip();
initLive();
document.body.dataset.ready = "true";
