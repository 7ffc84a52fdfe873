"""Files in: the watched jobs/ folder, claim folders, filing, HTTP submission."""
