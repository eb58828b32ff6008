"""Rendering: reports (Markdown, HTML with plots, JUnit, summary JSON), verdicts as text, the
capability matrix. Takes results and verdicts; decides nothing."""
