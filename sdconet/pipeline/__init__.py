"""The end-to-end demo: a resumable stage runner and the summary of what the stages wrote."""
