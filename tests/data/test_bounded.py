"""The bounded readers every stage uses on input it did not write."""

from __future__ import annotations

import os

import pytest

from bincounter.data import bounded


def test_nesting_depth_counts_brackets_but_not_those_inside_strings():
    assert bounded.nesting_depth('{"a": [1, {"b": []}], "c": "[[[[{{{{"}') == 4
    assert bounded.nesting_depth('["\\"[[[", "\\\\", [[]]]') == 3  # escaped quotes and backslashes
    assert bounded.nesting_depth("1") == 0
    assert bounded.nesting_depth("[" * 100_000 + "]" * 100_000) == 100_000


def test_loads_refuses_before_parsing_what_json_would_recurse_on():
    with pytest.raises(bounded.TooDeep, match="nested 100000 deep, over the limit of 32"):
        bounded.loads(b"[" * 100_000 + b"]" * 100_000, max_bytes=10**6, max_depth=32)
    with pytest.raises(bounded.TooLarge, match="11 bytes, over the limit of 10"):
        bounded.loads(b'"123456789"', max_bytes=10, max_depth=32)
    assert bounded.loads('{"a": [1]}'.encode("utf-16"), max_bytes=100, max_depth=2) == {"a": [1]}  # as json does


def test_capped_lines_never_hold_a_line_over_the_limit_whatever_the_chunks():
    data = b"short\n" + b"x" * 50 + b"\nlast line"
    for size in (1, 7, 64):
        chunks = [data[i:i + size] for i in range(0, len(data), size)]
        assert list(bounded.capped_lines(chunks, 10)) == [b"short\n", None, b"last line"]
        assert list(bounded.capped_lines(chunks, 8)) == [b"short\n", None, None]
        assert list(bounded.capped_lines(chunks, 100)) == [b"short\n", b"x" * 50 + b"\n", b"last line"]


def test_json_lines_gives_each_bad_line_as_its_error_and_goes_on(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"id": "1"}\n' + b"[" * 1000 + b"]" * 1000 + b'\n{"id": \n\n{"id": "2"}\n')
    values = [value for _, value in bounded.json_lines(path, max_bytes=10_000, max_depth=8)]
    assert values[0] == {"id": "1"} and values[-1] == {"id": "2"}
    assert isinstance(values[1], bounded.TooDeep) and isinstance(values[2], ValueError) and len(values) == 4


def test_read_file_refuses_symlinks_out_of_the_folder_and_special_files(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (root / "sub" / "inside").write_bytes(b"ok")
    (root / "sub" / "link-in").symlink_to(root / "sub" / "inside")
    (root / "sub" / "link-out").symlink_to(outside / "secret")
    (root / "linked-folder").symlink_to(outside)
    os.mkfifo(root / "sub" / "fifo")

    assert bounded.read_file(root / "sub" / "link-in", root=root) == b"ok"
    for path in (root / "sub" / "link-out", root / "linked-folder" / "secret", root / "sub" / ".." / ".." / "outside" / "secret"):
        with pytest.raises(bounded.OutsideFolder):
            bounded.read_file(path, root=root)
    with pytest.raises(bounded.NotAFile):
        bounded.read_file(root / "sub" / "fifo", root=root)  # without O_NONBLOCK this open would wait for ever
    with pytest.raises(bounded.NotAFile):
        bounded.read_file(root / "sub", root=root)
    with pytest.raises(bounded.TooLarge):
        bounded.read_file(root / "sub" / "inside", root=root, max_bytes=1)
    with pytest.raises(FileNotFoundError):
        bounded.read_file(root / "sub" / "absent", root=root)
