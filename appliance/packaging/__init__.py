"""Production packaging: the container entry points (`container`) and the signed offline bundle
(`bundle`). See docs/packaging.md."""
