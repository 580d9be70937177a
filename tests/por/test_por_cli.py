"""`rayforge por` and `rayforge verify` on the command line: exit 0 valid, 1 invalid, 2 malformed."""

import shutil

from click.testing import CliRunner

from rayforge.cli import main


def test_cli_exit_codes(plain_por, tmp_path):
    runner = CliRunner()
    por = tmp_path / "por"
    result = runner.invoke(main, ["por", str(plain_por["run_dir"]), "--point", "4", "--out", str(por)])
    assert result.exit_code == 0, result.output
    for selection in ("all", "topq:1", "random:3"):
        result = runner.invoke(main, ["verify", str(por), "--steps", selection])
        assert result.exit_code == 0 and "VALID" in result.output, result.output
    tampered = tmp_path / "tampered"
    shutil.copytree(por, tampered)
    (tampered / "ckpt-00000003.pt").write_bytes(b"\x80\x04not a checkpoint")
    result = runner.invoke(main, ["verify", str(tampered)])
    assert result.exit_code == 1 and "invalid: unexpected_file" in result.output
    (por / "por.json").write_text("{}")
    result = runner.invoke(main, ["verify", str(por)])
    assert result.exit_code == 2 and result.output.startswith("error:")


def test_minimal_por_verifies_and_never_holds_the_point(plain_por, tmp_path):
    import json

    import pyarrow.parquet as pq

    runner = CliRunner()
    por = tmp_path / "minimal"
    result = runner.invoke(main, ["por", str(plain_por["run_dir"]), "--point", "7", "--mode", "minimal",
                                  "--out", str(por)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((por / "por.json").read_text())
    assert manifest["excluded"] == [7]
    steps = pq.read_table(por / "steps.parquet").to_pydict()
    assert all(7 not in batch for batch in steps["batch"])
    result = runner.invoke(main, ["verify", str(por), "--steps", "all"])
    assert result.exit_code == 0 and "VALID" in result.output, result.output
