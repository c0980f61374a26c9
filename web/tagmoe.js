// comfyui-tagmoe front-end: shows on the nodes what the backend reports (where the loader
// placed the model, the seed the sampler used), as a read-only text area that is not saved
// with the workflow.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const INFO_WIDGET = "tagmoe_info";
const NODES_WITH_INFO = new Set(["TagMoEModelLoader", "TagMoESampler"]);

function showInfo(node, text) {
  let widget = node.widgets?.find((w) => w.name === INFO_WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, INFO_WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false; // display only: never part of widgets_values
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = 0.75;
      widget.inputEl.style.fontSize = "11px";
    }
  }
  widget.value = text;
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
  app.graph?.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "comfyui-tagmoe.info",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES_WITH_INFO.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text?.length) showInfo(this, message.text.join("\n"));
    };
  },
});
