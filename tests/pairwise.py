"""All-pairs sampling of a test matrix (a greedy covering array).

`all_pairs(columns)` returns rows (one value per column) such that every
pair of values from two different columns appears in at least one row:
the standard way to sample a large product (12 modes x 4 dtypes x 5
executions = 240 cells) in far fewer cells (about 60) while still trying
every mode with every dtype, every mode with every execution and every
dtype with every execution. Deterministic: the same input gives the same
rows, in order.
"""

import itertools


def all_pairs(columns, allowed=lambda row: True):
    """Rows of `itertools.product(*columns)` covering every pair.

    `allowed(row)` excludes impossible cells; pairs that occur in no
    allowed row are not required.
    """
    candidates = [row for row in itertools.product(*columns) if allowed(row)]

    def pairs(row):
        return {(i, row[i], j, row[j])
                for i, j in itertools.combinations(range(len(row)), 2)}

    uncovered = set().union(*(pairs(row) for row in candidates))
    rows = []
    while uncovered:
        best = max(candidates, key=lambda row: len(pairs(row) & uncovered))
        rows.append(best)
        uncovered -= pairs(best)
    return rows
