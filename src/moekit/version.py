"""moekit's version, in a leaf module so that any module can record it without importing the
package's public API (which would import everything)."""

__version__ = "0.1.0"
