// ComfyUI-VILA-U front-end extension: text on the VILA-U nodes.
//
// - Q&A nodes: the server streams the answer so far with send_progress_text (the front
//   end shows it in a text box on the node); when the node has run, its ui output
//   {"text": [answer, ...]} is put in the same box (HTML-escaped), so the answer stays
//   visible, also for a run that came from the cache or another tab.
// - Generation nodes: the server reports one `progress` step per grid position; the
//   node shows "position i / n" in the same kind of box while it generates.
//
// Only the extension API is used: app.registerExtension, the api's events, and the
// front end's own "progress_text" event (re-dispatched), so the box is the front
// end's own text-preview widget.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const QA_NODES = new Set(["VILAU_ImageQA", "VILAU_VideoQA"]);
const GENERATION_NODES = new Set(["VILAU_TextToImage", "VILAU_TextToVideo"]);

// as nodes/progress.py format_answers: one answer as is, several numbered
export function formatAnswers(answers) {
  if (answers.length === 1) return String(answers[0]);
  return answers.map((text, i) => `[${i + 1}] ${text}`).join("\n\n");
}

// the front end's text box renders its text as HTML (links, line breaks): an answer that
// contains "<b>" must show as written, not as markup
export function escapeHtml(text) {
  return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

export function positionText(value, max) {
  return `position ${value} / ${max}`;
}

function nodeType(nodeId) {
  // execution ids inside subgraphs are "outer:inner"; those are left to the front end
  const node = app.graph?.getNodeById(String(nodeId));
  return node?.comfyClass ?? node?.type;
}

function showText(nodeId, text) {
  api.dispatchCustomEvent("progress_text", { nodeId: String(nodeId), text });
}

app.registerExtension({
  name: "VILA-U.NodeText",

  setup() {
    api.addEventListener("progress", ({ detail }) => {
      if (detail?.node != null && GENERATION_NODES.has(nodeType(detail.node))) {
        showText(detail.node, positionText(detail.value, detail.max));
      }
    });
  },

  async beforeRegisterNodeDef(nodeType_, nodeData) {
    if (!QA_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType_.prototype.onExecuted;
    nodeType_.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const answers = output?.text;
      if (Array.isArray(answers) && answers.length > 0) {
        showText(this.id, escapeHtml(formatAnswers(answers)));
      }
    };
  },
});
