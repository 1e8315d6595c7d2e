"""Writing a benchmark's results: JSON whose paths inside this repository are relative to it,
so committed results name no machine's checkout."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def write_results(path: Path, result: dict[str, Any], indent: int = 2) -> None:
    """Write `result` as JSON to `path` (folders created), with the repository prefix removed."""
    text = json.dumps(result, indent=indent, default=str).replace(str(REPO) + "/", "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
