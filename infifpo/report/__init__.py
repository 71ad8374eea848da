"""Stage `report`: the paper-style table of a pipeline run (`stage`), its Markdown (`markdown`) and plots
(`plots`)."""
