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
    assert paths, "no results/setting_*.json"
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
