// ComfyUI-VILA-U front-end extension: text on the VILA-U nodes.
//
// - Q&A nodes own an "answer" box (a read-only text area). The server streams the answer
//   so far as "vilau.answer" messages while it is written; when the node has run, its ui
//   output {"text": [answer, ...]} fills the box with the final answers. The box is the
//   pack's own widget, so it stays after the run (newer front ends remove the core
//   progress-text box of every node when a job resets), it is saved in the workflow
//   (a serialized widget value, restored on load and page reload), and it is never sent
//   with the prompt.
// - Generating nodes (text to image/video and the edits) show "position i / n" in the front
//   end's own progress-text box: the server sends that text itself (nodes/progress.py
//   PositionProgress), so this file keeps no list of them.
//
// Only APIs present in the pinned front end (1.32) and the newest (1.5x) are used:
// app.registerExtension, the api's events, node.addDOMWidget, and app.rootGraph (with
// app.graph, its older name, as the fallback).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const QA_NODES = new Set(["VILAU_ImageQA", "VILAU_VideoQA", "VILAU_CaptionFolder"]);
export const ANSWER_EVENT = "vilau.answer"; // as nodes/progress.py ANSWER_EVENT
export const ANSWER_WIDGET = "answer";

// as nodes/progress.py format_answers: one answer as is, several numbered
export function formatAnswers(answers) {
  if (answers.length === 1) return String(answers[0]);
  return answers.map((text, i) => `[${i + 1}] ${text}`).join("\n\n");
}

function rootGraph() {
  return app.rootGraph ?? app.graph; // app.graph is deprecated in newer front ends
}

// A node by its execution id: "7" at the top level, "5:7" for node 7 inside the subgraph
// of node 5 (the same node, whichever graph the canvas shows).
export function nodeByExecutionId(executionId) {
  const path = String(executionId).split(":");
  let graph = rootGraph();
  for (const id of path.slice(0, -1)) {
    graph = graph?.getNodeById(id)?.subgraph;
  }
  return graph?.getNodeById(path[path.length - 1]) ?? null;
}

function nodeClass(node) {
  return node?.comfyClass ?? node?.type;
}

function answerWidget(node) {
  return node?.widgets?.find((w) => w.name === ANSWER_WIDGET);
}

function addAnswerWidget(node) {
  const box = document.createElement("textarea");
  box.readOnly = true;
  box.className = "comfy-multiline-input vilau-answer";
  box.placeholder = "The answer appears here while the node runs.";
  box.spellcheck = false;
  const widget = node.addDOMWidget(ANSWER_WIDGET, "vilau_answer", box, {
    getValue: () => box.value,
    setValue: (value) => {
      box.value = value ?? "";
    },
    getMinHeight: () => 80,
  });
  widget.options.serialize = false; // not an input of the node: never sent with the prompt
  widget.serialize = true; // but saved in the workflow, so the answer comes back on load
  return widget;
}

// Workflows saved before the `preset` input existed list their widget values without it, and the
// front end assigns them by position: the saved answer lands in `preset` (not one of its choices).
// Such a node gets its answer back and the preset that asks its question as typed.
export const CUSTOM_PRESET = "custom"; // as vilau_backend/decoding/prompts.py CUSTOM_QUESTION
function keepAnswerOfOlderWorkflow(node) {
  const preset = node.widgets?.find((w) => w.name === "preset");
  const choices = preset?.options?.values;
  if (!preset || !Array.isArray(choices) || choices.includes(preset.value)) return;
  const answer = answerWidget(node);
  if (answer && typeof preset.value === "string" && !answer.value) answer.value = preset.value;
  preset.value = CUSTOM_PRESET;
}

function showAnswer(node, text, { final = false } = {}) {
  const widget = answerWidget(node);
  if (!widget) return;
  // the final answer is a change of the workflow: the front end's change tracker then saves it
  // (the workflow kept for a page reload, the "modified" mark); streamed steps are not
  if (final) app.canvas?.emitBeforeChange?.();
  widget.value = text;
  node.setDirtyCanvas?.(true, true);
  if (final) app.canvas?.emitAfterChange?.();
}

app.registerExtension({
  name: "VILA-U.NodeText",

  setup() {
    api.addEventListener(ANSWER_EVENT, ({ detail }) => {
      const node = detail?.node != null ? nodeByExecutionId(detail.node) : null;
      if (node && QA_NODES.has(nodeClass(node))) showAnswer(node, String(detail.text ?? ""));
    });
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!QA_NODES.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      addAnswerWidget(this);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      keepAnswerOfOlderWorkflow(this);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const answers = output?.text;
      if (Array.isArray(answers) && answers.length > 0) showAnswer(this, formatAnswers(answers), { final: true });
    };
  },
});
