// Entry point: tabs, then the views (clip, live, cameras, events, models & training jobs). Showing a
// tab dispatches "tabshown" on document (detail: its name), for views that refresh while visible.

import { initCameras } from "./cameras.js";
import { initClip } from "./clip.js";
import { initEvents } from "./events.js";
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
    document.dispatchEvent(new CustomEvent("tabshown", { detail: name }));
  };
  for (const tab of tabs) tab.addEventListener("click", () => show(tab.dataset.tab));
  const wanted = location.hash.slice(1);
  return () => show(tabs.some((t) => t.dataset.tab === wanted) ? wanted : "clip");
}

const showFirstTab = initTabs();
initModels();
initClip();
initLive();
initCameras();
initEvents();
showFirstTab(); // after the views listen for "tabshown"
document.body.dataset.ready = "true";
