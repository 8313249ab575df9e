from vllm_topt.calibration.calibrate import main

main()
