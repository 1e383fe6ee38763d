"""Build a notebook from a python file with '# %%' (code) and '# %% [md]' (markdown) cells."""
import sys, nbformat
from nbformat.v4 import new_notebook, new_code_cell, new_markdown_cell
src, dst = sys.argv[1], sys.argv[2]
cells, cur, kind = [], [], None
def flush():
    if kind is None: return
    text = "\n".join(cur).strip("\n")
    if kind == "md":
        cells.append(new_markdown_cell("\n".join(l[2:] if l.startswith("# ") else l.lstrip("#") for l in text.splitlines())))
    else:
        c = new_code_cell(text)
        if kind == "params": c.metadata["tags"] = ["parameters"]
        cells.append(c)
for line in open(src).read().splitlines():
    if line.startswith("# %%"):
        flush(); cur = []
        kind = "md" if "[md]" in line else ("params" if "[params]" in line else "code")
    else:
        cur.append(line)
flush()
nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}, "language_info": {"name": "python"}})
nbformat.write(nb, dst)
