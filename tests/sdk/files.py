"""The Sprites SDK's filesystem handle against hull: write, read back byte
for byte, list, stat, rename, copy, chmod and a recursive delete.

Run by tests/tests/api_files.rs with SPRITES_URL, SPRITES_TOKEN and
SPRITE_NAME set; exits non-zero (with the reason) on the first mismatch.
"""

import hashlib
import os
import sys

import sprites
from sprites.exceptions import FileNotFoundError_, IsADirectoryError_


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)


client = sprites.SpritesClient(os.environ["SPRITES_TOKEN"], base_url=os.environ["SPRITES_URL"])
fs = client.sprite(os.environ["SPRITE_NAME"]).filesystem("/work")

# Binary, 17 MB (past two of hull's 8 MiB writeback windows), every byte
# value: written under a directory that does not exist yet (the SDK asks
# for parents by default), read back exactly.
blob = bytes(range(256)) * 4096 * 17 + os.urandom(123457)
(fs / "deep/dir/blob.bin").write_bytes(blob, mode=0o640)
back = (fs / "deep/dir/blob.bin").read_bytes()
check(len(back) == len(blob), f"read {len(back)} bytes, wrote {len(blob)}")
check(hashlib.sha256(back).digest() == hashlib.sha256(blob).digest(), "read back differs")

st = (fs / "deep/dir/blob.bin").stat()
check(st.size == len(blob), f"stat size {st.size}")
check(st.mode == "0640", f"stat mode {st.mode}")
check(not st.is_dir, "a file stats as a directory")
check(st.path == "/work/deep/dir/blob.bin", f"stat path {st.path}")

(fs / "deep/dir/notes.txt").write_text("hello\n")
names = sorted((fs / "deep/dir").listdir())
check(names == ["blob.bin", "notes.txt"], f"listdir {names}")

# Rename replaces, copy duplicates, chmod sets the bits.
(fs / "deep/dir/notes.txt").rename("renamed.txt")
check(not (fs / "deep/dir/notes.txt").exists(), "the old name is still there")
check((fs / "deep/dir/renamed.txt").read_text() == "hello\n", "renamed content")

(fs / "deep").copy_to(fs / "copy")
check((fs / "copy/dir/blob.bin").read_bytes() == blob, "copied blob differs")
check((fs / "copy/dir/blob.bin").stat().mode == "0640", "copy kept the mode")

(fs / "copy/dir/renamed.txt").chmod(0o755)
check((fs / "copy/dir/renamed.txt").stat().mode == "0755", "chmod")

# A directory is not read as a file.
try:
    (fs / "copy/dir").read_bytes()
    check(False, "reading a directory succeeded")
except IsADirectoryError_:
    pass

# A recursive delete removes the tree; the original is untouched.
(fs / "copy").rmtree()
check(not (fs / "copy").exists(), "copy still there after rmtree")
check(not (fs / "copy/dir/blob.bin").exists(), "copy's file still there after rmtree")
check((fs / "deep/dir/blob.bin").exists(), "rmtree of the copy removed the original")
try:
    (fs / "copy/nothing").read_bytes()
    check(False, "reading a missing file succeeded")
except FileNotFoundError_:
    pass

print("files ok")
