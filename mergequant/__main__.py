from mergequant.cli import main

main()
