"""The opening of a `python -c` script for an install without torch: a finder that refuses
torch, transformers and peft stands in for their absence."""

REFUSE_TORCH = (
    "import sys\n"
    "class Refuse:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('torch', 'transformers', 'peft'):\n"
    "            raise ImportError('not installed: ' + name)\n"
    "sys.meta_path.insert(0, Refuse())\n"
)
