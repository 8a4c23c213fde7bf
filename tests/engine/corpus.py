"""Sample text for training throwaway byte-level BPE tokenizers in tests: scripts, accents,
CJK, RTL, emoji with modifiers and joiners — what breaks incremental detokenization."""

MULTILINGUAL = [
    "Hello world! The quick brown fox jumps over the lazy dog. Numbers: 0123456789.",
    "Grüße aus München: café, naïve, déjà vu, señor, Ærøskøbing.",
    "你好，世界。我爱自然语言处理。こんにちは世界。안녕하세요 세계.",
    "Привет, мир! Γειά σου Κόσμε! مرحبا بالعالم. שלום עולם.",
    "Emoji: 🙂🚀🎉👍🏽 👨‍👩‍👧 ✨ — “quotes” and ‘single’ … done.",
]
CODE = "def f(x):\n    return x * 2  # code\n\tindented\r\nwindows"
