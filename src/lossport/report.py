"""The :class:`Report` that :func:`lossport.inspect` returns: figures, advice and their renders.

Figures (all measured with the autograd graph of a few batches, see :mod:`lossport.inspection`):

* **reach**: ``reach[part]`` the parametrised modules whose parameters the part's autograd graph reaches;
  ``modules[i].status`` says for each module whether some part reaches it, or why none does (``frozen``: no
  parameter requires grad; ``no loss``: called in the forward but no part's graph reaches it; ``not called``:
  never called in the forward of the measured batches).
* **pull**: ``pull[part][module] = mean_b ||g_{part,b}|module||``, the norm of the part's gradient on the
  module's own parameters, averaged over the batches ``b`` where the part is present.
* **conflict**: ``cos[module][i][j] = mean_b cos(g_{i,b}|module, g_{j,b}|module)`` over the batches where both
  parts are present with non-zero gradients (NaN when there is none); ``trunk_cos`` the same on the
  concatenation of every shared module (those reached by two parts or more).
* **scales**: ``values[part]`` the loss value (mean over labelled examples), ``weights[part]`` the applied
  weight (static times balancer, mean over batches), ``trunk_norm[part]`` the mean gradient norm on the shared
  trunk, and :meth:`Report.ratios` (``trunk_norm[i] / trunk_norm[j]``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

IMBALANCE = 10.0
"""Trunk gradient-norm ratio (with applied weights) from which the advice calls the parts unbalanced."""
CONFLICT = -0.1
"""Mean trunk cosine below which the advice calls two parts conflicting."""
WIDTH = 100
COMPACT = 12  # rows beyond which Report.table() merges rows reached alike and leaves out per-module cosines
"""Width of the terminal table."""


@dataclass
class ModuleInfo:
    """One module that owns parameters directly."""

    name: str
    kind: str
    params: int
    trainable: int
    status: str
    """``reached`` (by some part), ``frozen``, ``no loss`` (called, reached by no part), ``not called``, or
    ``not reached`` (reached by no part, and its calls cannot be seen: a Keras layer)."""
    members: int = 1
    """Modules in this row (``group_by`` groups several; ``name`` is then their common prefix)."""


@dataclass
class Report:
    """What :func:`lossport.inspect` measured (see the module docstring for the definitions)."""

    parts: list[str]
    modules: list[ModuleInfo]
    reach: dict[str, list[str]]
    reach_params: dict[str, list[str]]
    pull: dict[str, dict[str, float]]
    shared: list[str]
    cos: dict[str, list[list[float]]]
    trunk_cos: list[list[float]]
    trunk_norm: dict[str, float]
    values: dict[str, float]
    weights: dict[str, float]
    missing: dict[str, int]
    counts: dict[str, int]
    batches: int
    balance: str | None = None
    advice: list[str] = field(default_factory=list)
    grouping: str = ""
    """How modules were grouped into rows (empty: a row per module)."""

    # -- derived figures -------------------------------------------------------------------------------
    @property
    def measured(self) -> list[str]:
        """Parts present (labelled) in at least one measured batch."""
        return [p for p in self.parts if self.missing.get(p, 0) < self.batches]

    @property
    def effective_norm(self) -> dict[str, float]:
        """``|weight| * trunk_norm``: the pull on the trunk that training applies."""
        return {p: abs(self.weights.get(p, 1.0)) * self.trunk_norm[p] for p in self.trunk_norm}

    def ratios(self, *, weighted: bool = False) -> list[list[float]]:
        """``r[i][j] = trunk_norm[i] / trunk_norm[j]`` (NaN where undefined); ``weighted`` uses the applied
        weights."""
        n = self.effective_norm if weighted else self.trunk_norm
        out = []
        for a in self.parts:
            row = []
            for b in self.parts:
                x, y = n.get(a, math.nan), n.get(b, math.nan)
                row.append(x / y if y > 0 else math.nan)
            out.append(row)
        return out

    def module(self, name: str) -> ModuleInfo:
        """The :class:`ModuleInfo` of module ``name``."""
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(f"no parametrised module {name!r}; modules: {[m.name for m in self.modules]}")

    # -- renders -------------------------------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        """Plain Python (JSON-serialisable: NaN becomes ``None``)."""

        def clean(x: Any) -> Any:
            if isinstance(x, float):
                return None if math.isnan(x) else x
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [clean(v) for v in x]
            return x

        return clean(
            {
                "parts": list(self.parts),
                "batches": self.batches,
                "balance": self.balance,
                "modules": [vars(m).copy() for m in self.modules],
                "reach": self.reach,
                "reach_params": self.reach_params,
                "pull": self.pull,
                "shared": self.shared,
                "cos": self.cos,
                "trunk_cos": self.trunk_cos,
                "trunk_norm": self.trunk_norm,
                "ratios": self.ratios(),
                "values": self.values,
                "weights": self.weights,
                "missing": self.missing,
                "counts": self.counts,
                "advice": self.advice,
                "grouping": self.grouping,
            }
        )

    def table(self, width: int = WIDTH, *, detail: bool = False) -> str:
        """The terminal table: parts, reach and pull by module, trunk cosines and ratios, advice. For a net of more
        than :data:`COMPACT` rows (a detector, a backbone) consecutive rows reached by the same parts are printed as
        one (its pull is the gradient norm over all their parameters) and the per-module cosines are left out, so
        that the table stays about 40 lines; ``detail=True`` prints every row and section."""
        P = self.parts
        n_shared = sum(self.module(m).params for m in self.shared)
        bal = f", balance={self.balance}" if self.balance else ""
        lines = [
            f"lossport.inspect: {len(P)} parts on {self.batches} batches{bal}; "
            f"shared trunk: {len(self.shared)} {'rows' if self.grouping else 'modules'}, {_count(n_shared)} parameters",
        ]
        if self.grouping:
            lines += _wrap(f"({self.grouping})", width, indent=" ")
        lines.append("")
        rows = [["part", "value", "weight", "|g| trunk", "labelled", "missing"]]
        for p in P:
            rows.append(
                [
                    p,
                    _num(self.values.get(p, math.nan)),
                    _num(self.weights.get(p, math.nan)),
                    _num(self.trunk_norm.get(p, math.nan)) if self.shared else "-",
                    str(self.counts.get(p, 0)),
                    f"{self.missing.get(p, 0)}/{self.batches} batches" if self.missing.get(p, 0) else "-",
                ]
            )
        lines += _columns(rows)
        lines += ["", "Reach and pull: gradient norm of each part on each module ('.' = not reached)"]
        runs = self._runs(compact=not detail and len(self.modules) > COMPACT)
        labels = [_run_label(run) for run in runs]
        cells = [[self._run_pull(run, p) for p in P] for run in runs]
        marks = ["*" if run[0].name in self.shared else " " for run in runs]
        heads = list(P)
        if len(_blocks(["module", "type", "params", "status"], labels, heads, cells, width, True)) > 1:
            heads = [f"[{i + 1}]" for i in range(len(P))]  # numbered columns keep one block of rows
            if len(_blocks(["module", "type", "params", "status"], labels, heads, cells, width, True)) == 1:
                lines += _wrap("parts: " + ", ".join(f"{h} {p}" for h, p in zip(heads, P)), width, indent="  ")
            else:
                heads = list(P)
        lines += _grid(["module", "type", "params", "status"], labels, heads, cells, width, mark=marks)
        if len(runs) < len(self.modules):
            lines.append(
                f"  ({len(self.modules)} rows shown as {len(runs)}: consecutive rows reached by the same parts)"
            )
        if len(self.measured) >= 2 and self.shared:
            lines += ["", "Conflict on the shared trunk: mean cosine of the parts' gradients"]
            lines += _grid(
                ["part"],
                [(p,) for p in P],
                P,
                [[_num(c, cos=True) for c in r] for r in self.trunk_cos],
                width,
            )
            if detail or len(self.modules) <= COMPACT:  # else the |g| trunk column above gives the ratios
                lines += ["", "Pull ratio on the shared trunk: |g| of the row part / |g| of the column part"]
                lines += _grid(["part"], [(p,) for p in P], P, [[_num(c) for c in r] for r in self.ratios()], width)
            if len(self.shared) > COMPACT and not detail:
                lines += ["", f"Cosine per shared module: {len(self.shared)} rows, in report.table(detail=True)"]
            elif len(self.shared) > 1:
                lines += ["", "Cosine per shared module (pairs of parts)"]
                pairs = [(i, j) for i in range(len(P)) for j in range(i + 1, len(P))]
                heads = [f"{P[i]}~{P[j]}" for i, j in pairs]
                shared_labels = [(_short(m, 24),) for m in self.shared]
                cells = [[_num(self.cos[m][i][j], cos=True) for i, j in pairs] for m in self.shared]
                if len(_blocks(["module"], shared_labels, heads, cells, width, False)) > 1:
                    short = [f"[{i + 1}]~[{j + 1}]" for i, j in pairs]  # parts numbered as above
                    if len(_blocks(["module"], shared_labels, short, cells, width, False)) == 1:
                        heads = short
                        lines += _wrap("parts: " + ", ".join(f"[{i + 1}] {p}" for i, p in enumerate(P)), width, "  ")
                lines += _grid(["module"], shared_labels, heads, cells, width)
        if self.advice:
            lines += ["", "Advice"]
            for a in self.advice:
                lines += _wrap("- " + a, width, indent="  ")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _runs(self, compact: bool) -> list[list[ModuleInfo]]:
        """The rows in order, consecutive ones with the same status, shared mark and reaching parts together
        (``compact``), else one row each."""
        runs: list[list[ModuleInfo]] = []
        key = None
        for m in self.modules:
            k = (m.status, m.name in self.shared, tuple(m.name in self.pull.get(p, {}) for p in self.parts))
            if compact and runs and k == key:
                runs[-1].append(m)
            else:
                runs.append([m])
            key = k
        return runs

    def _run_pull(self, run: list[ModuleInfo], p: str) -> str:
        """A part's gradient norm over all the parameters of a run of rows (``.``: not reached)."""
        vals = [self.pull[p][m.name] for m in run if m.name in self.pull.get(p, {})]
        return _num(math.sqrt(sum(v * v for v in vals))) if vals else "."

    def plot(self, *, figsize: tuple[float, float] | None = None) -> Any:
        """A matplotlib ``Figure``: left, the parts x modules heatmap of ``log10`` gradient norms, unreached
        cells hatched and frozen / unreached modules greyed; right, the trunk cosine matrix."""
        import numpy as np
        from matplotlib.colors import TwoSlopeNorm
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle

        P, M = self.parts, [m.name for m in self.modules]
        two = len(self.measured) >= 2 and bool(self.shared)
        fig = Figure(figsize=figsize or (min(4 + 0.5 * len(M), 16) + (4 if two else 0), 2.2 + 0.45 * len(P)))
        axes = (
            fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(len(M), 1), len(P) + 1]}) if two else [fig.subplots()]
        )
        ax = axes[0]
        z = np.full((len(P), len(M)), np.nan)
        for i, p in enumerate(P):
            for j, m in enumerate(M):
                v = self.pull.get(p, {}).get(m)
                if v is not None and v > 0:
                    z[i, j] = math.log10(v)
        im = ax.imshow(np.ma.masked_invalid(z), aspect="auto", cmap="viridis")
        for i, p in enumerate(P):
            for j, m in enumerate(M):
                if m not in self.pull.get(p, {}):
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", color="0.6", lw=0))
                elif self.pull[p][m] == 0:
                    ax.text(j, i, "0", ha="center", va="center", fontsize=7, color="0.4")
        ax.set_xticks(range(len(M)))
        ax.set_xticklabels(
            [
                _short(m.name, 18)
                + ("*" if m.name in self.shared else "")
                + ("" if m.status == "reached" else f" [{m.status}]")
                for m in self.modules
            ],
            rotation=60,
            ha="right",
            fontsize=8,
        )
        for tick, info in zip(ax.get_xticklabels(), self.modules):
            if info.status != "reached":
                tick.set_color("0.55")
        ax.set_yticks(range(len(P)))
        ax.set_yticklabels(P)
        ax.set_title("gradient norm (log10) of each part; hatched: not reached; *: shared", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
        if two:
            cx = axes[1]
            c = np.array(self.trunk_cos, dtype=float)
            ci = cx.imshow(np.ma.masked_invalid(c), cmap="RdBu", norm=TwoSlopeNorm(0.0, -1.0, 1.0))
            for i in range(len(P)):
                for j in range(len(P)):
                    if not math.isnan(c[i, j]):
                        colour = "white" if abs(c[i, j]) > 0.6 else "black"
                        cx.text(j, i, f"{c[i, j]:.2f}", ha="center", va="center", fontsize=8, color=colour)
            cx.set_xticks(range(len(P)))
            cx.set_xticklabels(P, rotation=45, ha="right")
            cx.set_yticks(range(len(P)))
            cx.set_yticklabels(P)
            cx.set_title("cosine on the shared trunk", fontsize=9)
            fig.colorbar(ci, ax=cx, fraction=0.05, pad=0.02)
        fig.tight_layout()
        return fig


# -- advice -------------------------------------------------------------------------------------------------
def advise(r: Report, available: Sequence[str] = ()) -> list[str]:
    """Plain sentences derived from the figures of ``r``; each holds only when its condition does and cites
    the figure behind it. ``available``: the registered balancer names (the suggestions name only those)."""
    from .balance import suggest

    scale_names = suggest(("loss", "learned"), among=available)
    grad_names = suggest(("gramian",), among=available)
    return [
        *_advise_labels(r),
        *_advise_modules(r),
        *_advise_zero_paths(r),
        *_advise_balance(r, scale_names),
        *_advise_conflict(r, grad_names),
    ]


def _advise_labels(r: Report) -> list[str]:
    """Parts with missing labels in some or all batches, and parts that reach nothing."""
    out: list[str] = []
    for p in r.parts:
        k = r.missing.get(p, 0)
        if k == r.batches:
            out.append(
                f"'{p}' had no labelled example in any of the {r.batches} measured batches, so nothing is "
                "known about it: measure more batches (batches=) or check its targets (NaN / -100 mark "
                "missing labels)."
            )
        elif k:
            out.append(
                f"'{p}' had no labelled example in {k} of {r.batches} batches ({r.counts.get(p, 0)} labelled "
                f"examples in all): it gets no gradient in those steps, so its effective weight is about "
                f"{(r.batches - k) / r.batches:.2g} of what was set; its figures here come from the other "
                f"{r.batches - k} batches."
            )
    out.extend(
        f"'{p}' reaches no trainable parameter (its reach is empty): training cannot reduce it; "
        "check that its output does not come from frozen or detached layers only."
        for p in r.measured
        if not r.reach.get(p)
    )
    return out


def _advise_modules(r: Report) -> list[str]:
    """Modules that never train: not reached, feeding no loss, or never called."""
    out: list[str] = []
    for m in r.modules:
        params = f" ({_count(m.trainable)} trainable parameters)"
        if m.members > 1:
            what, runs, calls = f"the {m.members} modules under '{m.name}'{params}", "run", "are"
        else:
            what, runs, calls = f"module '{m.name}'{params}", "runs", "is"
        if m.status == "not reached":
            out.append(
                f"{what}: no part's gradient reaches it, so it never trains; give the output it feeds a loss, "
                "or freeze / remove it."
            )
        elif m.status == "no loss":
            out.append(
                f"{what} {runs} in the forward but no part's gradient reaches it: its output feeds no loss (or is "
                "detached), so it never trains; give that output a loss or freeze / remove the module."
            )
        elif m.status == "not called":
            out.append(
                f"{what} {calls} never called in the forward of the measured batches: it never trains (and makes "
                "DistributedDataParallel need find_unused_parameters=True)."
            )
    return out


def _advise_zero_paths(r: Report) -> list[str]:
    """Modules a part reaches with an exactly zero gradient in every batch."""
    zero_by: dict[tuple[str, ...], list[str]] = {}  # modules a part reaches with a zero gradient -> the parts
    for p in r.measured:
        zero = tuple(m for m, v in r.pull.get(p, {}).items() if v == 0)
        if zero and len(zero) < len(r.pull.get(p, {})):
            zero_by.setdefault(zero, []).append(p)
    out: list[str] = []
    for zero, ps in zero_by.items():
        who = " and ".join(f"'{p}'" for p in ps)
        names = ", ".join(f"'{m}'" for m in zero[:4]) + (f" and {len(zero) - 4} more" if len(zero) > 4 else "")
        out.append(
            f"{who} {'reach' if len(ps) > 1 else 'reaches'} {names} but the gradient there is exactly 0 in every "
            "measured batch: the path is switched off on these examples (ReLUs off, a feature level no example "
            "uses, a zero gate), so those parameters learn nothing from it here."
        )
    return out


def _advise_balance(r: Report, scale_names: Sequence[str]) -> list[str]:
    """Separate parameters (nothing to balance), or one part pulling much harder on the shared trunk."""
    if len(r.measured) >= 2 and not r.shared:
        return [
            "no module is reached by two parts: the parts train separate parameters, so they cannot conflict "
            "and a balancer only changes each part's effective learning rate."
        ]
    meas = [p for p in r.measured if p in r.trunk_norm]
    eff = r.effective_norm
    pos = [p for p in meas if eff[p] > 0]
    if len(meas) < 2 or len(pos) < 2:
        return []
    hi = max(pos, key=lambda p: eff[p])
    lo = min(pos, key=lambda p: eff[p])
    ratio = eff[hi] / eff[lo]
    if ratio < IMBALANCE:
        return []
    weighted = any(abs(r.weights.get(p, 1.0) - 1.0) > 1e-12 for p in meas)
    what = "gradient norms times applied weights" if weighted else "gradient norms"
    # w_p proportional to 1 / ||g_p||, scaled to keep the sum of the applied weights
    tot = sum(r.weights.get(p, 1.0) for p in pos)
    inv = {p: 1.0 / r.trunk_norm[p] for p in pos}
    sugg = ", ".join(f"'{p}': {_sig(tot * inv[p] / sum(inv.values()))}" for p in pos)
    how = (
        "try balance=" + " or ".join(repr(n) for n in scale_names[:2]) + " (loss scales), or "
        if scale_names
        else "try "
    )
    return [
        f"'{hi}' pulls {_times(ratio)}x harder than '{lo}' on the shared trunk ({what} "
        f"{_num(eff[hi])} vs {_num(eff[lo])}): the trunk is trained mostly for '{hi}'; {how}"
        f"static weights={{{sugg}}}, which equalise the trunk pulls on these batches."
    ]


def _advise_conflict(r: Report, grad_names: Sequence[str]) -> list[str]:
    """The worst conflicting pair on the shared trunk, or the statement that no pair conflicts."""
    if len([p for p in r.measured if p in r.trunk_norm]) < 2:
        return []
    pairs = [(i, j) for i in range(len(r.parts)) for j in range(i + 1, len(r.parts))]
    cosines = [(r.trunk_cos[i][j], r.parts[i], r.parts[j]) for i, j in pairs if not math.isnan(r.trunk_cos[i][j])]
    conflicts = [c for c in cosines if c[0] < CONFLICT]
    if conflicts:
        c, a, b = min(conflicts, key=lambda x: x[0])
        more = f" ({len(conflicts)} conflicting pairs in all)" if len(conflicts) > 1 else ""
        meth = (
            f"a gradient method ({', '.join(repr(n) for n in grad_names[:3])}) removes the conflicting "
            "component instead of letting the larger gradient win"
            if grad_names
            else "a gradient-level balancer removes the conflicting component"
        )
        return [
            f"'{a}' and '{b}' conflict on the shared trunk (mean cosine {c:.2f}){more}: a step that "
            f"reduces one tends to increase the other; {meth}."
        ]
    if cosines and all(c[0] >= 0 for c in cosines):
        return [
            f"no pair of parts conflicts on the shared trunk (lowest mean cosine {min(c[0] for c in cosines):.2f}): "
            "gradient-conflict methods have little to remove; balancing the scales matters more."
        ]
    return []


# -- formatting helpers --------------------------------------------------------------------------------------
def _num(x: float, cos: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if cos:
        return f"{x:+.2f}"
    if x == 0:
        return "0"
    a = abs(x)
    if 1e-3 <= a < 1e5:
        return f"{x:.3g}" if a < 1000 else f"{x:.0f}"
    return f"{x:.2e}"


def _times(x: float) -> str:
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def _sig(x: float) -> str:
    return f"{x:.2g}"


def _count(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    if n >= 10_000:
        return f"{n / 1e3:.0f}k"
    if n >= 1000:
        return f"{n / 1e3:.1f}k"
    return str(n)


def _run_label(run: list[ModuleInfo]) -> tuple[str, str, str, str]:
    """Name, type, parameter count and status of a run of rows (their common dotted prefix for several)."""
    m = run[0]
    status = "" if m.status == "reached" else m.status
    if len(run) == 1:
        return _short(m.name, 24), m.kind[:12], _count(m.params), status
    parts = [r.name.split(".") for r in run]
    common = [col[0] for col in itertools.takewhile(lambda col: len(set(col)) == 1, zip(*parts))]
    name = ".".join(common) + ".*" if common else "*"
    members = sum(r.members for r in run)
    return _short(f"{name} ({len(run)})", 24), f"{members} modules"[:12], _count(sum(r.params for r in run)), status


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else "…" + s[-(n - 1) :]


def _columns(rows: list[list[str]]) -> list[str]:
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows]


def _grid(
    label_heads: list[str],
    labels: Sequence[Sequence[str]],
    heads: Sequence[str],
    cells: list[list[str]],
    width: int,
    mark: Sequence[str] | None = None,
) -> list[str]:
    """Rows of labels then one column per head; the value columns are split into blocks that fit ``width``."""
    nl = len(label_heads)
    right = [h == "params" for h in label_heads]
    lw = [max([len(label_heads[k])] + [len(lab[k]) for lab in labels]) for k in range(nl)]
    cw = [max([len(heads[j])] + [len(r[j]) for r in cells]) for j in range(len(heads))]
    blocks = _blocks(label_heads, labels, heads, cells, width, bool(mark))
    out: list[str] = []
    for bi, block in enumerate(blocks):
        if bi:
            out.append("")

        out.append(_row(label_heads, lw, right, [heads[j] for j in block], [cw[j] for j in block], " ", mark))
        for i, lab in enumerate(labels):
            vals = [cells[i][j] for j in block]
            out.append(_row(lab, lw, right, vals, [cw[j] for j in block], mark[i] if mark else " ", mark))
    if mark:
        out.append("* shared: reached by two parts or more")
    return out


def _blocks(
    label_heads: list[str],
    labels: Sequence[Sequence[str]],
    heads: Sequence[str],
    cells: list[list[str]],
    width: int,
    mark: bool,
) -> list[list[int]]:
    """The value columns of :func:`_grid` split into blocks whose rows fit ``width``."""
    nl = len(label_heads)
    lw = [max([len(label_heads[k])] + [len(lab[k]) for lab in labels]) for k in range(nl)]
    left = sum(lw) + 2 * nl + (2 if mark else 0)
    cw = [max([len(heads[j])] + [len(r[j]) for r in cells]) for j in range(len(heads))]
    blocks: list[list[int]] = []
    cur: list[int] = []
    used = left
    for j in range(len(heads)):
        if cur and used + cw[j] + 2 > width:
            blocks.append(cur)
            cur, used = [], left
        cur.append(j)
        used += cw[j] + 2
    blocks.append(cur)
    return blocks


def _row(
    lab: Sequence[str],
    lw: list[int],
    right: list[bool],
    vals: list[str],
    cw: list[int],
    m: str,
    mark: Sequence[str] | None,
) -> str:
    s = "  ".join(lab[k].rjust(lw[k]) if right[k] else lab[k].ljust(lw[k]) for k in range(len(lab)))
    s = (m + " " if mark else "") + s
    return (s + "  " + "  ".join(v.rjust(w) for w, v in zip(cw, vals))).rstrip()


def _wrap(text: str, width: int, indent: str) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width, subsequent_indent=indent, break_on_hyphens=False)


__all__ = ["CONFLICT", "IMBALANCE", "ModuleInfo", "Report", "advise"]
