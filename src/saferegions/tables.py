"""How the notebooks show a table: numbers to 3 significant digits, each 95% interval beside its estimate
("0.138 [0.107, 0.168]"), a stated reason in place of every missing value, and the params as a table.

Every stage module re-exports `table` and `params_table`, so a notebook shows any frame with
`display(stage.table(frame))`. Formatting is for reading only: the numbers stay full precision in the frame,
in metrics.json and in the executed .ipynb."""
from __future__ import annotations

import math
import numbers
import re

import pandas as pd
from pandas.io.formats.style import Styler

MISSING = "—"
_NAN_WORD = re.compile(r"[+-]?\bnan\b", re.IGNORECASE)
_LONG_DECIMAL = re.compile(r"(?<![\w.:])[-+]?\d+\.\d{5,}(?![\w.])")   # a number with 5+ decimals inside text


def _is_missing(x) -> bool:
    return x is None or x is pd.NA or (isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isnan(x))


def number(x, missing: str = MISSING) -> str:
    """3 significant digits and never more than 4 decimals: 0.138, 12.3, 1,332 and 1.23e-05 for tiny values."""
    if _is_missing(x):
        return missing
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, numbers.Integral):
        return f"{x:,}" if abs(x) >= 10_000 else str(x)
    x = float(x)
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) < 0.01:
        return f"{x:.2e}"
    return f"{x:#.3g}"


def _is_interval(x) -> bool:
    return (isinstance(x, (list, tuple)) and len(x) == 2
            and all(_is_missing(c) or (isinstance(c, numbers.Real) and not isinstance(c, bool)) for c in x))


def interval(ci, missing: str = MISSING) -> str:
    """A 95% interval as "[low, high]"; an absent or undefined one as `missing`."""
    if ci is None or not _is_interval(ci) or all(_is_missing(c) for c in ci):
        return missing
    return f"[{number(ci[0])}, {number(ci[1])}]"


def is_interval_name(name) -> bool:
    """Whether a column or key holds 95% intervals: "ci", "<x>_ci", "ci_<kind>" (e.g. ci_one_flip)."""
    return isinstance(name, str) and (name == "ci" or name.endswith("_ci") or name.startswith("ci_")
                                      or "_ci_" in name)


def value(x, missing: str = MISSING, name=None) -> str:
    """Any cell as text: numbers as `number`, lists and dicts item by item, and a [low, high] pair as
    `interval` where `name` (its column or key) says it is one. Inside a library's text, a NaN reads as "n/a"
    and a number with 5 or more decimals as `number` does."""
    if isinstance(x, str):
        return _LONG_DECIMAL.sub(lambda m: number(float(m.group())), _NAN_WORD.sub("n/a", x))
    if isinstance(x, dict):
        return "; ".join(f"{k}: {value(v, name=k)}" for k, v in x.items()) or MISSING
    if is_interval_name(name) and (x is None or _is_interval(x)):
        return interval(x, missing)
    if isinstance(x, (list, tuple, set)):
        return ", ".join(value(v) for v in x) or MISSING
    if _is_missing(x) or isinstance(x, numbers.Number):
        return number(x, missing)
    return str(x)


def with_interval(estimate, ci, missing: str = MISSING) -> str:
    """ "0.138 [0.107, 0.168]": an estimate with its interval beside it."""
    if _is_missing(estimate):
        return missing
    return f"{number(estimate)} {interval(ci)}" if ci is not None and _is_interval(ci) else number(estimate)


def table(frame, caption: str | None = None, missing: dict[str, str] | str = MISSING,
          intervals: dict[str, str] | pd.DataFrame | None = None, index: bool = True):
    """A Styler that shows `frame` (DataFrame, Series or Styler) for reading.

    `intervals` ({estimate column: interval column}) joins each pair into one column; a column `x` with a
    column `x_ci` beside it is joined the same way without being named. `intervals` may instead be a frame of
    [low, high] shaped like `frame`: each cell then gets its own. `missing` is the text of an absent value, one
    for all columns or {column: reason} (others: "—")."""
    if isinstance(frame, Styler):
        caption = caption or frame.caption
        frame = frame.data
    if isinstance(frame, pd.Series):
        frame = frame.to_frame()
    frame = frame.copy()
    text = [c for i, c in enumerate(frame.columns) if _is_text(frame.iloc[:, i])]
    if isinstance(intervals, pd.DataFrame):
        for c in frame.columns:
            frame[c] = [with_interval(e, ci, _reason(missing, c)) for e, ci in zip(frame[c], intervals[c])]
        intervals = None
    pairs = {c: f"{c}_ci" for c in frame.columns if isinstance(c, str) and f"{c}_ci" in frame.columns}
    pairs.update(intervals or {})
    for est, ci in pairs.items():
        frame[est] = [with_interval(e, c, _reason(missing, est)) for e, c in zip(frame[est], frame[ci])]
    frame = frame.drop(columns=list(pairs.values()))
    cells = pd.DataFrame([[value(v, _reason(missing, c), c) for c, v in zip(frame.columns, row)]
                          for row in frame.itertuples(index=False)], index=frame.index, columns=frame.columns)
    styler = cells.style.format_index(value, axis=0).format_index(value, axis=1)
    if cells.index.is_unique and cells.columns.is_unique:   # Styler addresses cells by label
        text = [c for c in text if c in cells.columns]
        numeric = [c for c in cells.columns if c not in text]
        if text:
            styler = styler.set_properties(subset=text, **{"text-align": "left"})
        if numeric:   # "0.138 [0.107, 0.168]" on one line
            styler = styler.set_properties(subset=numeric, **{"white-space": "nowrap"})
    if not index:
        styler = styler.hide(axis="index")
    return styler.set_caption(caption) if caption else styler


def _is_text(column: pd.Series) -> bool:
    missing = column.map(_is_missing)
    return not missing.all() and column.map(lambda v: isinstance(v, str)).where(~missing, True).all()


def _reason(missing, column) -> str:
    return missing.get(column, MISSING) if isinstance(missing, dict) else missing


def params_table(params: dict, summary: str = "Params of this run (papermill parameters)"):
    """The stage's params as one row per setting, nested sections flattened to dotted names, folded under
    `summary` (a click opens it) so that a long list does not push the results down."""
    from IPython.display import HTML
    rows = [{"section": key.split(".")[0], "param": key.partition(".")[2], "value": value(v)}
            for key, v in _flatten(params)]
    frame = pd.DataFrame(rows, columns=["section", "param", "value"]).set_index(["section", "param"])
    styler = frame.style.set_properties(**{"text-align": "left"})
    return HTML(f"<details><summary>{summary}: {len(rows)} settings</summary>{styler.to_html()}</details>")


def _flatten(params: dict, prefix: str = ""):
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _flatten(v, key + ".")
        else:
            yield key, v
