"""RESULTS.md's tables are the committed results, rendered: a rerun that moves a number must rewrite both.
And the README stays a reader's page: short, with the pictures it shows present in the repository."""
import json
import re
from pathlib import Path

import eval as ev

ROOT = Path(__file__).resolve().parents[1]


def test_results_tables_are_rendered_from_results_json():
    results = (ROOT / "RESULTS.md").read_text()
    paths = sorted((ROOT / "results").glob("setting_*.json"))
    required = ("setting_a", "setting_b", "setting_c_text", "setting_c_infill", "setting_c_encode",
                "setting_c_base_pooling", "setting_c_ablations_text", "setting_c_ablations_infill",
                "setting_c_ablations_encode", "setting_c_seed1", "setting_c_seed2")
    assert set(required) <= {p.stem for p in paths}, "a committed results file is missing"
    for path in paths:
        report = json.loads(path.read_text())
        if "results" not in report:
            continue
        assert report["provenance"]["commit"], f"results/{path.name} does not record the commit that produced it"
        assert ev.markdown(report["results"]) in results, f"RESULTS.md's table differs from results/{path.name}"


def test_readme_is_short_and_its_images_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.split()) <= 2500, "README.md is over 2,500 words: move the detail to RESULTS.md or docs/"
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme):
        assert (ROOT / image).is_file(), f"README.md shows {image}, which is not in the repository"


def test_the_lesson_path_names_real_functions_with_their_lengths():
    """Each row of the README's lesson path: the functions exist in that file and have the lines it says."""
    import ast
    rows = re.findall(r"^\| \d+ \| .* \| `(\w+\.py)` \| (.*) \| ([\d + ]+) \|$", (ROOT / "README.md").read_text(), re.M)
    assert len(rows) >= 20, "the README's lesson path table is missing"
    for file, names, lengths in rows:
        spans = {}  # "name" or "Class.name": lines, decorators included
        for node in ast.parse((ROOT / file).read_text()).body:
            members = node.body if isinstance(node, ast.ClassDef) else []
            for n, prefix in [(node, "")] + [(m, node.name + ".") for m in members]:
                if isinstance(n, (ast.FunctionDef, ast.ClassDef)):
                    spans[prefix + n.name] = n.end_lineno - min([n.lineno] + [d.lineno for d in n.decorator_list]) + 1
        for name, length in zip(re.findall(r"`([\w.]+)`", names), lengths.split("+"), strict=True):
            found = [k for k in spans if k == name or k.endswith("." + name)]
            assert len(found) == 1 and spans[found[0]] == int(length), (file, name, length, found)
