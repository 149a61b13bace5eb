// The dashboard's own script: confirmation of actions, polls paused in a hidden tab, and the
// live task view (server-sent events of server-rendered HTML, fed by Node.watch). No inline
// scripts: the pages' content security policy allows only the dashboard's own files.
"use strict";

document.addEventListener("submit", (event) => {
  const question = event.target.dataset && event.target.dataset.confirm;
  if (question && !window.confirm(question)) event.preventDefault();
});

document.addEventListener("click", (event) => {
  if (event.target.matches && event.target.matches("[data-back]")) {
    event.preventDefault();
    history.back();
  }
});

// The pages' htmx requests are all polls (the overview's counts, the task list): a hidden tab
// skips its turns, and the next turn after it is shown again brings the page up to date.
document.addEventListener("htmx:beforeRequest", (event) => {
  if (document.hidden) event.preventDefault();
});

// Show only the actions that the task's state allows (the server checks them anyway).
function syncActions() {
  const marker = document.querySelector("[data-task-state]");
  if (!marker) return;
  const state = marker.dataset.taskState;
  document.querySelectorAll("form[data-when]").forEach((form) => {
    form.hidden = !form.dataset.when.split(" ").includes(state);
  });
  const run = document.getElementById("run");
  if (run) run.textContent = state === "paused" ? "Resume" : "Run";
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-live]").forEach((box) => {
    const source = new EventSource(box.dataset.live);
    source.onmessage = (event) => {
      box.innerHTML = event.data;
      syncActions();
    };
    source.addEventListener("end", () => source.close());
  });
});
