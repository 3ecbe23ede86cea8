"""Data engine: fully / semi-automatic labelling (autolabel, merge), model-in-the-loop rounds (loop)
and the assisted-manual annotation page (annotate)."""
