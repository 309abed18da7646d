# pithtrain_add_plugin(): builds the plugin in the calling folder plugins/<kind>/<name>/ as
# <build>/plugins/<kind>_<name>.so from plugin.cpp + <name>.cpp, and its test test_<name>.cpp (if
# present) linking the same objects statically. Everything is derived from the folder name.

# One precompiled <ATen/ATen.h> shared by every plugin: parsing it is most of a plugin's compile time,
# and the edit-build-check loop of a plugin author should stay short (docs/plugins.md has the figures).
function(pithtrain_plugin_pch)
  if(TARGET pithtrain_plugin_pch)
    return()
  endif()
  file(WRITE ${CMAKE_BINARY_DIR}/pithtrain_plugin_pch.cpp "// Carrier for the plugins' precompiled header.\n")
  add_library(pithtrain_plugin_pch OBJECT ${CMAKE_BINARY_DIR}/pithtrain_plugin_pch.cpp)
  target_link_libraries(pithtrain_plugin_pch PUBLIC pithtrain::core)
  set_target_properties(pithtrain_plugin_pch PROPERTIES CXX_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON
                        POSITION_INDEPENDENT_CODE ON)
  target_precompile_headers(pithtrain_plugin_pch PRIVATE <ATen/ATen.h>)
endfunction()

function(pithtrain_add_plugin)
  get_filename_component(name ${CMAKE_CURRENT_SOURCE_DIR} NAME)
  get_filename_component(kind_dir ${CMAKE_CURRENT_SOURCE_DIR} DIRECTORY)
  get_filename_component(kind ${kind_dir} NAME)
  set(target ${kind}_${name})

  add_library(${target}_objects OBJECT plugin.cpp ${name}.cpp)
  target_link_libraries(${target}_objects PUBLIC pithtrain::core)
  # PIC explicitly: out of tree nothing sets CMAKE_POSITION_INDEPENDENT_CODE, and the objects go into a .so.
  set_target_properties(${target}_objects PROPERTIES CXX_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON
                        POSITION_INDEPENDENT_CODE ON)
  pithtrain_plugin_pch()
  target_precompile_headers(${target}_objects REUSE_FROM pithtrain_plugin_pch)

  add_library(${target} MODULE $<TARGET_OBJECTS:${target}_objects>)
  target_link_libraries(${target} PRIVATE pithtrain::core)
  set_target_properties(${target} PROPERTIES PREFIX "" OUTPUT_NAME ${target}
                        LIBRARY_OUTPUT_DIRECTORY ${PITHTRAIN_PLUGIN_OUTPUT_DIR})
  if(TARGET pithtrain_plugins)  # in tree: part of the build and of an install (lib/pithtrain/plugins)
    add_dependencies(pithtrain_plugins ${target})
    set_target_properties(${target} PROPERTIES INSTALL_RPATH "$ORIGIN/../.." INSTALL_RPATH_USE_LINK_PATH TRUE)
    install(TARGETS ${target} LIBRARY DESTINATION lib/pithtrain/plugins)
  endif()

  file(GLOB test_source CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/test_${name}.cpp)
  if(PITHTRAIN_BUILD_TESTS AND test_source)
    add_executable(test_${target} test_${name}.cpp $<TARGET_OBJECTS:${target}_objects>)
    target_link_libraries(test_${target} PRIVATE pithtrain::core GTest::gtest_main)
    target_compile_definitions(test_${target} PRIVATE PITHTRAIN_PLUGIN_DIR="${PITHTRAIN_PLUGIN_OUTPUT_DIR}")
    if(TARGET pithtrain_plugins)
      add_dependencies(test_${target} pithtrain_plugins)
    endif()
    gtest_discover_tests(test_${target} DISCOVERY_MODE PRE_TEST DISCOVERY_TIMEOUT 60)
  endif()
endfunction()
