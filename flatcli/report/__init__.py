"""Results for people: tables and histograms for the terminal, CSV files and figures."""
