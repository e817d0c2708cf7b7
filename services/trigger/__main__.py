from services.common.serve import main

main("trigger")
