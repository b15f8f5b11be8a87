"""The offline built-in default domains: rendered glyphs and small registry-shipped datasets."""
