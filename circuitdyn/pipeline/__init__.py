"""What opens runs and extracts: circuits of every checkpoint (`extraction`), method-noise replicates (`replicates`),
comparisons that open runs (`compare`), plans, the paper's task circuits (`tasks`), calibration (`calibrate`), Ray
(`ray`)."""
