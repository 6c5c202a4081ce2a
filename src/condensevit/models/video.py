"""placeholder: registered models come with their issue."""
