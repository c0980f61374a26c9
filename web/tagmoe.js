// comfyui-tagmoe front-end.
// * Shows on the nodes what the backend reports (where the loader placed the model, the seed
//   the sampler used, the refined instruction, the routing report) in a read-only text area
//   that is not saved with the workflow.
// * Gives TAG-MoE Task Tags a hierarchical picker: one scope (the node's dropdown), then the
//   edit types and preservations as checkboxes, kept in sync with the node's `tags` text.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const INFO_WIDGET = "tagmoe_info";
const NODES_WITH_INFO = new Set([
  "TagMoEModelLoader", "TagMoESampler", "TagMoEPromptRefine", "TagMoETaskTags", "TagMoERoutingMap",
  "TagMoELoadDiffusionModel", "TagMoELoraLoader", "TagMoETextEncode",
]);
// Nodes that also show image previews: their info is one canvas-drawn line, so that it sits among
// the widgets and the preview is drawn below it (a text area floats over the canvas, and the preview).
const ONE_LINE_INFO = new Set(["TagMoESampler"]);
const LINE_HEIGHT = 15;
const MAX_LINES = 16;
const TIERS = {
  "edit types": ["object editing", "attribute editing", "style transfer", "pose editing", "background editing",
                 "illumination editing"],
  "preservations": ["structure preservation", "background preservation", "identity preservation",
                    "face preservation", "style preservation"],
};

function showInfo(node, text) {
  const oneLine = ONE_LINE_INFO.has(node.comfyClass ?? node.type);
  if (oneLine) text = text.split("\n").join("; ");
  let widget = node.widgets?.find((w) => w.name === INFO_WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, INFO_WIDGET, ["STRING", { multiline: !oneLine }], app).widget;
    widget.serialize = false; // display only: never part of widgets_values
    if (oneLine) widget.disabled = true;
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = 0.75;
      widget.inputEl.style.fontSize = "11px";
      widget.inputEl.style.lineHeight = `${LINE_HEIGHT}px`;
    }
  }
  widget.value = text;
  if (widget.inputEl) {
    // tall enough for every line (up to MAX_LINES, then it scrolls), so the node grows to show them
    const lines = Math.min(text.split("\n").length, MAX_LINES);
    const height = lines * LINE_HEIGHT + 24; // + the text area's padding and border
    widget.options = { ...(widget.options ?? {}), getMinHeight: () => height, getHeight: () => height };
    widget.computeSize = (width) => [width, height];
  }
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
  app.graph?.setDirtyCanvas(true, true);
}

const PICKER_HEIGHT = 170; // two fieldsets of up to six checkbox rows

function fitNode(node) {
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
}

function parseTags(text) {
  return new Set((text || "").split(/[,;]/).map((t) => t.trim().toLowerCase()).filter(Boolean));
}

// The annotation rules, mirrored from tagmoe_core/taxonomy.py: style transfer excludes
// attribute editing, and "image generation" takes no edit types.
function applyRules(selected, scope, changed) {
  if (changed === "style transfer" && selected.has("style transfer")) selected.delete("attribute editing");
  if (changed === "attribute editing" && selected.has("attribute editing")) selected.delete("style transfer");
  if (scope === "image generation") TIERS["edit types"].forEach((t) => selected.delete(t));
  return selected;
}

function addTagPicker(node) {
  const tagsWidget = node.widgets?.find((w) => w.name === "tags");
  const scopeWidget = node.widgets?.find((w) => w.name === "scope");
  if (!tagsWidget || !scopeWidget || !node.addDOMWidget) return;
  const root = document.createElement("div");
  root.style.cssText = "display:flex;gap:10px;font-size:11px;color:var(--input-text,#ddd);padding:2px 4px;";
  const boxes = {};
  for (const [tier, names] of Object.entries(TIERS)) {
    const column = document.createElement("fieldset");
    column.style.cssText = "border:1px solid #555;border-radius:4px;padding:2px 6px;margin:0;";
    const legend = document.createElement("legend");
    legend.textContent = tier;
    column.appendChild(legend);
    for (const name of names) {
      const label = document.createElement("label");
      label.style.cssText = "display:block;white-space:nowrap;cursor:pointer;";
      const box = document.createElement("input");
      box.type = "checkbox";
      box.onchange = () => {
        const selected = parseTags(tagsWidget.value);
        box.checked ? selected.add(name) : selected.delete(name);
        applyRules(selected, scopeWidget.value, name);
        tagsWidget.value = [...TIERS["edit types"], ...TIERS["preservations"]].filter((t) => selected.has(t)).join(", ");
        sync();
      };
      boxes[name] = box;
      label.append(box, " " + name);
      column.appendChild(label);
    }
    root.appendChild(column);
  }
  function sync() {
    const selected = parseTags(tagsWidget.value);
    const generation = scopeWidget.value === "image generation";
    for (const [name, box] of Object.entries(boxes)) {
      box.checked = selected.has(name);
      box.disabled = generation && TIERS["edit types"].includes(name);
    }
  }
  node.addDOMWidget("tag_picker", "tagmoe_picker", root, {
    serialize: false, hideOnZoom: true, getMinHeight: () => PICKER_HEIGHT, getMaxHeight: () => PICKER_HEIGHT,
  });
  fitNode(node);
  for (const widget of [tagsWidget, scopeWidget]) {
    const callback = widget.callback;
    widget.callback = function () {
      const result = callback?.apply(this, arguments);
      sync();
      return result;
    };
  }
  sync();
}

app.registerExtension({
  name: "comfyui-tagmoe.ui",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (NODES_WITH_INFO.has(nodeData.name)) {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        if (message?.text?.length) showInfo(this, message.text.join("\n"));
      };
    }
    if (nodeData.name === "TagMoETaskTags") {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const result = onNodeCreated?.apply(this, arguments);
        addTagPicker(this);
        return result;
      };
      const onConfigure = nodeType.prototype.onConfigure;
      nodeType.prototype.onConfigure = function () {
        const result = onConfigure?.apply(this, arguments);
        fitNode(this); // a saved size from before the picker would cut it off
        return result;
      };
    }
  },
});
