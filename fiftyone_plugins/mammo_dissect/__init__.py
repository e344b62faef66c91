"""The ``@mammo/dissect`` FiftyOne plugin: the "Neuron map" panel and four operators.

Operators (operator browser, or Python ``foo.execute_operator("@mammo/dissect/<name>", ...)`` on a
dataset made by ``mammo fiftyone sync``):

* ``label_units`` (params ``units`` "3,5,10-12" or a list, ``concept``): label units in the store.
* ``create_concept`` (``name``, optional ``description``, ``colour``).
* ``show_unit_patches`` (``unit``): the grid shows the unit's top-k patches, best first, masks on.
* ``refresh_from_store``: copy the store's labels into the neurons dataset.

The panel holds little state (the selected units and the two inputs) and reads everything it shows
from the store and the datasets at each render. Every re-render is followed by an empty selection
event from the plot; that event is ignored, so a lasso selection survives until it is used or
cleared with the button. Inputs are cleared after use (panel state persists across reloads).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import fiftyone.operators as foo
import fiftyone.operators.types as types


def _project_root() -> Path:
    """The folder holding this project's packages: where Python finds ``fiftyone_plugins`` (the installed
    ``mammo-dissect``, or the checkout on ``PYTHONPATH`` as ``mammo up`` starts the App), else the checkout
    this folder is linked from. Found from the package, not from this file: the FiftyOne way to install a
    plugin copies its folder."""
    spec = importlib.util.find_spec("fiftyone_plugins")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]).parent
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "fiftyone_plugins").is_dir():
        return checkout
    raise ImportError("the @mammo/dissect plugin needs the mammo-dissect package: "
                      "fiftyone plugins requirements @mammo/dissect --install")


def _project_importable() -> None:
    """Let the App's server process import this project.

    The server runs with ``fiftyone/server/`` as ``sys.path[0]``, whose ``workspace.py`` shadows our
    ``workspace`` package; the project root is put first.
    """
    root = str(_project_root())
    shadow = sys.modules.get("workspace")
    if shadow is not None and not hasattr(shadow, "__path__"):
        del sys.modules["workspace"]
    if sys.path[:1] != [root]:
        sys.path.insert(0, root)


_project_importable()

from fiftyone_plugins import actions  # noqa: E402

NEW_CONCEPT_HINT = "or a new concept"
# The inputs sit in the "labelling" row, so the App keeps their values under that key of the state.
NEW_KEY = "labelling.new_concept"
CHOICE_KEY = "labelling.concept_choice"


def _context(ctx):
    return actions.context_of(ctx.dataset)


def _units_param(value) -> list[int] | str:
    if value is None:
        return []
    return value if isinstance(value, (list, tuple, str)) else [value]


# ---------------------------------------------------------------------------------- operators
class LabelUnits(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(name="label_units", label="Neuron map: label units with a concept",
                                  dynamic=True)

    def resolve_input(self, ctx):
        inputs = types.Object()
        if isinstance(ctx.params.get("units"), (list, tuple)):  # from Python: a list of unit indices
            inputs.list("units", types.Number(int=True), required=True, label="Units")
        else:
            inputs.str("units", required=True, label="Units", description="e.g. 3,5,10-12")
        choices = types.AutocompleteView()
        try:
            for name, _n in actions.concept_choices(_context(ctx)):
                choices.add_choice(name, label=name)
        except actions.PluginError:
            pass
        inputs.str("concept", required=True, label="Concept", view=choices,
                   description="an existing concept, or a new name")
        return types.Property(inputs)

    def execute(self, ctx):
        mc = _context(ctx)
        changed = actions.label_units(mc, _units_param(ctx.params.get("units")), ctx.params.get("concept"),
                                      by=actions.actor(ctx))
        return {"changed": changed}


class CreateConcept(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(name="create_concept", label="Neuron map: create a concept")

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.str("name", required=True, label="Name")
        inputs.str("description", label="Description")
        inputs.str("colour", label="Colour (#rrggbb, optional)")
        return types.Property(inputs)

    def execute(self, ctx):
        concept = actions.create_concept(_context(ctx), ctx.params.get("name") or "", by=actions.actor(ctx),
                                         description=ctx.params.get("description") or None,
                                         colour=ctx.params.get("colour") or None)
        return {"concept_id": concept.concept_id, "name": concept.name, "colour": concept.colour}


class ShowUnitPatches(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(name="show_unit_patches", label="Neuron map: show the top patches of a unit")

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.int("unit", required=True, label="Unit", min=0)
        return types.Property(inputs)

    def execute(self, ctx):
        mc = _context(ctx)
        view = actions.unit_view(mc, ctx.params.get("unit"))
        if ctx.dataset.name == mc.patches_name:
            ctx.ops.set_view(view)
        return {"unit": int(ctx.params.get("unit")), "patch_ids": view.values("patch_id")}


class RefreshFromStore(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(name="refresh_from_store", label="Neuron map: refresh labels from the store")

    def execute(self, ctx):
        changed = actions.refresh(_context(ctx))
        if changed:
            ctx.ops.reload_dataset()
        return {"changed": changed}


# -------------------------------------------------------------------------------------- panel
class NeuronMap(foo.Panel):
    @property
    def config(self):
        return foo.PanelConfig(name="neuron_map", label="Neuron map", icon="scatter_plot",
                               help_markdown="Units of the dissected layer by PCA of their activations. "
                               "Click a unit to see its top patches; lasso units to label them.")

    # -- events
    def on_load(self, ctx):
        # Inputs persist across reloads: start clean, keep nothing half-typed.
        ctx.panel.state.set({NEW_KEY: "", CHOICE_KEY: None})

    def on_click_unit(self, ctx):
        unit = ctx.params.get("id")
        try:
            mc = _context(ctx)
            view = actions.unit_view(mc, unit)
        except actions.PluginError as error:
            ctx.ops.notify(str(error), variant="error")
            return
        ctx.panel.state.unit = int(unit)
        if ctx.dataset.name == mc.patches_name:
            ctx.ops.set_view(view)

    def on_select_units(self, ctx):
        points = ctx.params.get("data") or []
        if not points:
            return  # the empty selection event that follows every re-render: keep the selection
        units = sorted({int(p["id"]) for p in points if p.get("id") is not None})
        ctx.panel.state.selected_units = units

    def on_clear(self, ctx):
        self._clear_inputs(ctx)

    def on_label(self, ctx):
        state = ctx.panel.state
        units = list(state.selected_units or [])
        concept = (state.get(NEW_KEY) or "").strip() or (state.get(CHOICE_KEY) or "")
        try:
            changed = actions.label_units(_context(ctx), units, concept, by=actions.actor(ctx))
        except actions.MammoError as error:
            ctx.ops.notify(str(error), variant="error")
            return
        state.message = f"Labelled {len(units)} unit(s) as \"{concept}\" ({changed} changed)."
        ctx.ops.notify(state.message, variant="success")
        self._clear_inputs(ctx)

    def on_accept(self, ctx):
        self._decide(ctx, accept=True)

    def on_reject(self, ctx):
        self._decide(ctx, accept=False)

    def _decide(self, ctx, *, accept: bool):
        units = list(ctx.panel.state.selected_units or [])
        try:
            decided = actions.decide_proposals(_context(ctx), units, accept=accept, by=actions.actor(ctx))
        except actions.MammoError as error:
            ctx.ops.notify(str(error), variant="error")
            return
        verb = "Accepted" if accept else "Rejected"
        ctx.panel.state.message = f"{verb} {len(decided)} proposal(s): " + "; ".join(
            f"unit {p.unit} {p.concept}" for p in decided[:8])
        ctx.ops.notify(ctx.panel.state.message, variant="success")
        self._clear_inputs(ctx)

    def on_refresh(self, ctx):
        try:
            changed = actions.refresh(_context(ctx))
        except actions.PluginError as error:
            ctx.ops.notify(str(error), variant="error")
            return
        ctx.panel.state.message = f"Refreshed from the store ({changed} unit(s) changed)."

    def on_show_all(self, ctx):
        ctx.panel.state.unit = None
        ctx.ops.clear_view()

    def on_change_selected(self, ctx):
        pass  # re-render only: the report follows the selected sample

    def on_change_dataset(self, ctx):
        self._clear_inputs(ctx)
        ctx.panel.state.unit = None

    @staticmethod
    def _clear_inputs(ctx):
        ctx.panel.state.set({"selected_units": [], NEW_KEY: "", CHOICE_KEY: None})

    # -- layout
    def render(self, ctx):
        panel = types.Object()
        try:
            mc = _context(ctx)
        except actions.PluginError as error:
            panel.md(f"**Neuron map**\n\n{error}", name="error")
            return types.Property(panel, view=types.GridView(orientation="vertical"))
        state = ctx.panel.state
        selected = {int(u) for u in (state.selected_units or [])}
        points = actions.map_points(mc)
        traces, layout = actions.scatter(points, selected)
        n_labelled = sum(c is not None for c in points.concept)
        header = (f"**{len(points.units)} units** of `{mc.layer}` · {n_labelled} labelled · "
                  f"run `{mc.meta.get('run_id')}`")
        if points.query_label:
            header += f"  \nLarge points: aligned with the {points.query_label}"
        if points.proposed:
            header += (f"  \nDiamonds: {len(points.proposed)} unit(s) with a proposed concept (hover to see it); "
                       "select them to accept or reject")
        if points.disputed:
            header += (f"  \nRed ring: {len(points.disputed)} disputed unit(s), readers named different concepts "
                       "(`mammo concepts agreement`)")
        panel.md(header, name="header")
        panel.plot("map", data=traces, layout=layout, config={"displaylogo": False, "scrollZoom": True},
                   on_click=self.on_click_unit, on_selected=self.on_select_units, height="420px")
        if selected:
            shown = ", ".join(str(u) for u in sorted(selected)[:30]) + (" …" if len(selected) > 30 else "")
            panel.md(f"**Selected: {len(selected)} unit(s)** ({shown})", name="selection")
        else:
            panel.md("Click a unit to see its top patches in the grid. Lasso or box-select units to "
                     "label them.", name="selection")
        box = panel.v_stack("labelling", gap=1)
        choices = actions.concept_choices(mc)
        if choices:
            dropdown = types.DropdownView(label="Existing concept", placeholder="choose a concept")
            for name, n in choices:
                dropdown.add_choice(name, label=f"{name} ({n} unit{'s' if n != 1 else ''})")
            box.enum("concept_choice", dropdown.values(), view=dropdown)
        box.str("new_concept", view=types.TextFieldView(
            label=NEW_CONCEPT_HINT if choices else "New concept", placeholder="e.g. spiculated margin"))
        buttons = panel.h_stack("buttons", align_x="left")
        buttons.btn("label_btn", label=f"Label {len(selected)} unit(s)", on_click=self.on_label,
                    disabled=not selected, variant="contained")
        buttons.btn("clear_btn", label="Clear selection", on_click=self.on_clear, disabled=not selected)
        if selected & set(points.proposed):
            buttons.btn("accept_btn", label="Accept proposals", on_click=self.on_accept, variant="outlined")
            buttons.btn("reject_btn", label="Reject proposals", on_click=self.on_reject)
        tools = panel.h_stack("tools")
        tools.btn("refresh_btn", label="Refresh from store", on_click=self.on_refresh, variant="outlined")
        if state.unit is not None:
            tools.btn("all_btn", label=f"Unit {state.unit} shown · show all patches", on_click=self.on_show_all)
        if state.message:
            panel.md(state.message, name="message")
        _report_section(ctx, panel, mc)
        return types.Property(panel, view=types.GridView(orientation="vertical", gap=1))


def _report_section(ctx, panel, mc):
    """The two bar charts of the selected patch's report (see :mod:`fiftyone_plugins.report_view`)."""
    from fiftyone_plugins import report_view

    ids = list(ctx.selected or [])
    if not ids or ctx.dataset.name != mc.patches_name:
        panel.md("Select a patch in the grid to see its report (concept activations).", name="report_hint")
        return
    try:
        charts = report_view.charts_for_sample(mc, ids[0])
    except actions.MammoError as error:
        panel.md(f"No report: {error}", name="report_hint")
        return
    if charts is None:
        panel.md("Reports are not available in this installation.", name="report_hint")
        return
    panel.md(charts["title"], name="report_title")
    for i, (data, layout) in enumerate(charts["plots"]):
        panel.plot(f"report_{i}", data=data, layout=layout, config={"displaylogo": False}, height="260px")


def register(p):
    p.register(LabelUnits)
    p.register(CreateConcept)
    p.register(ShowUnitPatches)
    p.register(RefreshFromStore)
    p.register(NeuronMap)
